// Demo tools the page can run itself, so that a tool call can be tried end to end without writing
// one: get_weather (made-up weather, labelled as such) and calculate (real arithmetic). Their
// definitions are those the bundled model was trained with (lfm2/train/synth.py, `_classic`), so
// it calls them. Other tools' results the user types in.

export const DEMO_TOOLS = [
  {
    type: "function",
    function: {
      name: "get_weather",
      description: "Get the current weather in a city",
      parameters: {
        type: "object",
        properties: { city: { type: "string", description: "The city name" } },
        required: ["city"],
      },
    },
  },
  {
    type: "function",
    function: {
      name: "calculate",
      description: "Evaluate an arithmetic expression",
      parameters: {
        type: "object",
        properties: { expression: { type: "string", description: "The expression, e.g. 2 + 3 * 4" } },
        required: ["expression"],
      },
    },
  },
];

const DEMO_NAMES = new Set(DEMO_TOOLS.map((tool) => tool.function.name));

/** @param {string} name */
export function isDemoTool(name) {
  return DEMO_NAMES.has(name);
}

/**
 * A tool call's arguments as an object, or null when they are not a JSON object.
 * @param {string} text
 */
export function parseArguments(text) {
  try {
    const value = JSON.parse(text);
    return value && typeof value === "object" && !Array.isArray(value) ? value : null;
  } catch {
    return null;
  }
}

/**
 * A flat object as JSON spelled like Python's json.dumps ('{"a": 1, "b": "x"}'): the bundled model
 * was trained on tool results in that spelling, and answers from them less well without the spaces.
 * @param {Record<string, unknown>} value
 */
function toolJson(value) {
  return `{${Object.entries(value).map(([key, item]) => `${JSON.stringify(key)}: ${JSON.stringify(item)}`).join(", ")}}`;
}

/**
 * A demo tool's result, as the JSON text a tool message carries.
 * @param {string} name
 * @param {string} argumentsText
 * @returns {string}
 */
export function runDemoTool(name, argumentsText) {
  const args = parseArguments(argumentsText) ?? {};
  if (name === "get_weather") {
    // Made up: the page has no network beyond its server. Fixed, so that a demo is reproducible.
    return toolJson({ temperature: 18, condition: "cloudy" });
  }
  if (name === "calculate") {
    try {
      return toolJson({ value: calculate(String(args.expression ?? "")) });
    } catch (err) {
      return toolJson({ error: err.message });
    }
  }
  return toolJson({ error: `no demo tool named ${name}` });
}

/**
 * Arithmetic with + - * / % ^, parentheses and unary minus, by recursive descent (no eval: the
 * page's Content-Security-Policy forbids it, and the expression is the model's).
 * @param {string} text
 * @returns {number}
 */
export function calculate(text) {
  const tokens = text.match(/\d+(?:\.\d+)?(?:e[+-]?\d+)?|\*\*|[-+*/%^()]|\S/gi) ?? [];
  let at = 0;
  const peek = () => tokens[at];
  const take = () => tokens[at++];

  function primary() {
    const token = take();
    if (token === "(") {
      const value = sum();
      if (take() !== ")") throw new Error("a ( is not closed");
      return value;
    }
    if (token === "-") return -primary();
    if (token === "+") return primary();
    if (token !== undefined && /^\d/.test(token)) return Number(token);
    throw new Error(token === undefined ? "the expression ends too soon" : `unexpected '${token}'`);
  }
  function power() {
    const base = primary();
    if (peek() === "^" || peek() === "**") {
      take();
      return base ** power(); // right-associative
    }
    return base;
  }
  function product() {
    let value = power();
    while (["*", "/", "%"].includes(peek())) {
      const op = take();
      const right = power();
      value = op === "*" ? value * right : op === "/" ? value / right : value % right;
    }
    return value;
  }
  function sum() {
    let value = product();
    while (peek() === "+" || peek() === "-") value = take() === "+" ? value + product() : value - product();
    return value;
  }

  const value = sum();
  if (at < tokens.length) throw new Error(`unexpected '${tokens[at]}'`);
  if (!Number.isFinite(value)) throw new Error("the result is not a finite number");
  return value;
}
