// Model output to HTML: Markdown (marked), code highlighted (highlight.js), math kept as its TeX
// source, and the result sanitized (DOMPurify). Model output is untrusted: raw HTML in it is shown
// as text, never parsed, and DOMPurify then removes anything executable that Markdown itself could
// produce (a javascript: link, say). Images in Markdown become links, so that a reply cannot make
// the browser fetch anything.
import DOMPurify from "dompurify";
import hljs from "highlight.js/lib/core";
import bash from "highlight.js/lib/languages/bash";
import c from "highlight.js/lib/languages/c";
import cpp from "highlight.js/lib/languages/cpp";
import css from "highlight.js/lib/languages/css";
import javascript from "highlight.js/lib/languages/javascript";
import json from "highlight.js/lib/languages/json";
import python from "highlight.js/lib/languages/python";
import rust from "highlight.js/lib/languages/rust";
import sql from "highlight.js/lib/languages/sql";
import typescript from "highlight.js/lib/languages/typescript";
import xml from "highlight.js/lib/languages/xml";
import yaml from "highlight.js/lib/languages/yaml";
import { Marked } from "marked";

const LANGUAGES = { bash, c, cpp, css, javascript, json, python, rust, sql, typescript, xml, yaml };
for (const [name, language] of Object.entries(LANGUAGES)) hljs.registerLanguage(name, language);

/** @param {string} text */
export function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (ch) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[ch]);
}

function mathExtension(name, level, open, pattern) {
  return {
    name,
    level,
    start: (src) => {
      const at = src.indexOf(open);
      return at < 0 ? undefined : at;
    },
    tokenizer(src) {
      const match = pattern.exec(src);
      if (match) return { type: name, raw: match[0], text: match[1].trim() };
      return undefined;
    },
    renderer: (token) =>
      level === "block"
        ? `<div class="math math-block" role="math">${escapeHtml(token.text)}</div>\n`
        : `<span class="math" role="math">${escapeHtml(token.text)}</span>`,
  };
}

// $$...$$ and \[...\] on their own lines; $...$ (not "$5 and $10": no space inside the dollars,
// no digit after the closing one) and \(...\) inline.
const MATH = [
  mathExtension("mathBlock", "block", "$$", /^\$\$([\s\S]+?)\$\$[^\S\n]*(?:\n|$)/),
  mathExtension("mathBracketBlock", "block", "\\[", /^\\\[([\s\S]+?)\\\][^\S\n]*(?:\n|$)/),
  mathExtension("mathInline", "inline", "$", /^\$(?!\s)((?:\\.|[^\\$\n])+?)(?<!\s)\$(?!\d)/),
  mathExtension("mathParen", "inline", "\\(", /^\\\(([\s\S]+?)\\\)/),
];

function highlight(code, lang) {
  const name = (lang || "").trim().split(/\s+/)[0].toLowerCase();
  if (name && hljs.getLanguage(name)) return hljs.highlight(code, { language: name, ignoreIllegals: true }).value;
  if (!name && code.length < 20000) return hljs.highlightAuto(code).value;
  return escapeHtml(code);
}

const marked = new Marked({
  gfm: true,
  extensions: MATH,
  renderer: {
    html: ({ text, block }) => (block ? `<p class="raw-html">${escapeHtml(text.trim())}</p>\n` : escapeHtml(text)),
    code({ text, lang }) {
      const label = lang ? ` data-lang="${escapeHtml(lang.split(/\s+/)[0])}"` : "";
      return `<pre${label}><code class="hljs">${highlight(text.replace(/\n$/, ""), lang)}</code></pre>\n`;
    },
    image: ({ href, text }) => `<a href="${escapeHtml(href)}" class="image-link">${escapeHtml(`[image: ${text || href}]`)}</a>`,
  },
});

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

const PURIFY = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: ["style", "img", "svg", "math", "form", "input", "button", "textarea", "select", "iframe", "video", "audio"],
  FORBID_ATTR: ["style", "srcset", "action", "formaction"],
  ADD_ATTR: ["target"],
};

/**
 * Untrusted Markdown to safe HTML.
 * @param {string} text
 * @returns {string}
 */
export function renderMarkdown(text) {
  return DOMPurify.sanitize(marked.parse(text, { async: false }), PURIFY);
}
