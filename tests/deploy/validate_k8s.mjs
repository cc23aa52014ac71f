// Validates Kubernetes and Istio objects against their published JSON schemas, with the npm
// packages kubernetes-models (Kubernetes API) and @kubernetes-models/istio (Istio CRDs):
//
//   node validate_k8s.mjs docs.json      (docs.json: a JSON array of objects)
//
// It must sit next to the node_modules holding them (tests/deploy/test_istio.py copies it there).
// Prints one JSON line per object: {"kind", "name", "ok", "error"}; exits 1 if any is invalid.
// The schemas check types, enums, formats and required fields; like the API server without
// strict field validation, they do not reject unknown fields.
import { readFileSync } from "node:fs";

function modulePath(apiVersion) {
  const [group, version] = apiVersion.includes("/") ? apiVersion.split("/") : ["", apiVersion];
  if (group.endsWith("istio.io")) return `@kubernetes-models/istio/${group}/${version}`;
  return group ? `kubernetes-models/${group}/${version}` : `kubernetes-models/${version}`;
}

let failed = 0;
for (const doc of JSON.parse(readFileSync(process.argv[2], "utf8"))) {
  const out = { kind: doc.kind, name: doc.metadata?.name, ok: false, error: null };
  try {
    const mod = await import(modulePath(doc.apiVersion));
    const Model = mod[doc.kind];
    if (!Model) throw new Error(`no schema for ${doc.apiVersion} ${doc.kind}`);
    new Model(doc).validate();
    out.ok = true;
  } catch (e) {
    out.error = String(e.message || e);
    failed++;
  }
  console.log(JSON.stringify(out));
}
process.exit(failed ? 1 : 0);
