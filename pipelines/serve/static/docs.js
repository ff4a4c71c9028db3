// instdiff API docs page: lists the endpoints of openapi.json (same origin, no external assets).
"use strict";

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}

function endpointCard(path, method, op) {
  const card = el("div", undefined, "card");
  const head = el("h3");
  head.appendChild(el("code", `${method.toUpperCase()} ${path}`));
  card.appendChild(head);
  const text = (op.description || op.summary || "").trim();
  if (text) card.appendChild(el("p", text));
  const body = op.requestBody && op.requestBody.content;
  if (body) card.appendChild(el("p", `Body: ${Object.keys(body).join(" or ")}`, "hint"));
  const params = (op.parameters || []).map((p) => `${p.name} (${p.in})`);
  if (params.length) card.appendChild(el("p", `Parameters: ${params.join(", ")}`, "hint"));
  return card;
}

async function main() {
  const box = document.getElementById("endpoints");
  try {
    const res = await fetch("openapi.json");
    if (!res.ok) throw new Error(`openapi.json answered ${res.status}`);
    const spec = await res.json();
    const cards = [];
    for (const [path, ops] of Object.entries(spec.paths || {})) {
      for (const [method, op] of Object.entries(ops)) cards.push(endpointCard(path, method, op || {}));
    }
    box.replaceChildren(...cards);
  } catch (err) {
    const e = document.getElementById("error");
    e.textContent = `Cannot list the endpoints: ${err.message}; the schema is at openapi.json.`;
    e.hidden = false;
  }
}

main();
