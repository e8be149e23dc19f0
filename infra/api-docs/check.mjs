// Validates the API descriptions with validators independent of the code that made them:
//   - the OpenAPI 3.1 document each running server serves at /api/openapi.json (URLs given
//     as arguments), with @seriousme/openapi-schema-validator (the official JSON schemas);
//   - docs/asyncapi.yaml (AsyncAPI 3), with @asyncapi/parser (the official parser and rules),
//     plus checks that it names every control message type and close code of the protocol.
// Exits non-zero with the reasons on any failure.
import { readFile } from "node:fs/promises";
import { Validator } from "@seriousme/openapi-schema-validator";
import { Parser, fromFile } from "@asyncapi/parser";

const failures = [];

for (const url of process.argv.slice(2)) {
  const res = await fetch(url);
  if (res.status !== 200) {
    failures.push(`${url}: HTTP ${res.status}`);
    continue;
  }
  const doc = await res.json();
  const validator = new Validator();
  const result = await validator.validate(doc);
  if (!result.valid) {
    failures.push(`${url}: invalid OpenAPI: ${JSON.stringify(result.errors).slice(0, 2000)}`);
  } else if (!doc.openapi?.startsWith("3.1")) {
    failures.push(`${url}: OpenAPI ${doc.openapi}, expected 3.1`);
  } else {
    console.log(`${url}: valid OpenAPI ${doc.openapi}, ${doc.info?.title} (${Object.keys(doc.paths).length} paths)`);
  }
}

const asyncapi = new URL("../../docs/asyncapi.yaml", import.meta.url).pathname;
const parser = new Parser();
const { document, diagnostics } = await fromFile(parser, asyncapi).parse();
const errors = diagnostics.filter((d) => d.severity === 0);
if (!document || errors.length) {
  failures.push(`docs/asyncapi.yaml: ${errors.map((d) => `${d.path.join(".")}: ${d.message}`).join("; ")}`);
} else {
  const text = await readFile(asyncapi, "utf8");
  const wanted = [
    "hub.connected", "hub.gap", "hub.error", "hub.refreshed", "hub.closing",
    "4001", "4003", "4008", "4010", "1012", "1009", "1008",
    "order.status.changed", "moderation.results", "dlq-error",
  ];
  const missing = wanted.filter((w) => !text.includes(w));
  if (missing.length) failures.push(`docs/asyncapi.yaml does not mention: ${missing.join(", ")}`);
  else console.log(`docs/asyncapi.yaml: valid AsyncAPI ${document.version()} (${document.channels().length} channels, ${document.operations().length} operations)`);
}

if (failures.length) {
  for (const f of failures) console.error(`api-docs: ${f}`);
  process.exit(1);
}
