// Builds the chat page into ../lfm2/web/static, the folder the Python package serves and ships:
// app.js (src/main.js and its npm dependencies in one minified script), app.css, index.html,
// favicon.svg, the dependencies' licences, and source-hash.txt (a digest of everything the build
// reads, which tests/test_web_ui.py recomputes to catch a page that was not rebuilt).
import { createHash } from "node:crypto";
import { copyFileSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join, relative } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";

const here = fileURLToPath(new URL(".", import.meta.url));
const out = join(here, "..", "lfm2", "web", "static");
const DEPENDENCIES = ["marked", "dompurify", "highlight.js"];

function files(dir) {
  return readdirSync(dir).flatMap((name) => {
    const path = join(dir, name);
    return statSync(path).isDirectory() ? files(path) : [path];
  });
}

/** sha256 over the build's inputs: each file's path (relative to webui/, "/"-separated) and bytes. */
function sourceHash() {
  const inputs = [...files(join(here, "src")), join(here, "build.mjs"), join(here, "package-lock.json")]
    .map((path) => relative(here, path).split("\\").join("/"))
    .sort();
  const hash = createHash("sha256");
  for (const name of inputs) {
    hash.update(name + "\0");
    hash.update(readFileSync(join(here, name)));
    hash.update("\0");
  }
  return hash.digest("hex");
}

rmSync(out, { recursive: true, force: true });
mkdirSync(out, { recursive: true });
await build({
  entryPoints: [join(here, "src", "main.js")],
  outfile: join(out, "app.js"),
  bundle: true,
  minify: true,
  format: "iife",
  target: ["chrome123", "firefox120", "safari17.5"],
  legalComments: "none", // the licences go whole into licenses.txt
  charset: "utf8",
  logLevel: "warning",
});
for (const name of ["index.html", "app.css", "favicon.svg"]) copyFileSync(join(here, "src", name), join(out, name));
const licenses = DEPENDENCIES.map((name) => {
  const version = JSON.parse(readFileSync(join(here, "node_modules", name, "package.json"), "utf8")).version;
  const text = readFileSync(join(here, "node_modules", name, "LICENSE"), "utf8").trim();
  return `${name} ${version}\n\n${text}\n`;
});
writeFileSync(join(out, "licenses.txt"), `The chat page bundles these packages (app.js):\n\n${licenses.join("\n---\n\n")}`);
writeFileSync(join(out, "source-hash.txt"), sourceHash() + "\n");
console.log(`built ${relative(process.cwd(), out)}: ${readdirSync(out).join(", ")}`);
