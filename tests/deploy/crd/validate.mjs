// Validates Kubernetes custom resources against the JSON schemas that the
// @kubernetes-models npm packages generate from each project's CRDs (or API types),
// installed by tests/deploy/crd/install (pinned in package.json beside this file).
// stdin: a JSON array of objects. stdout: a JSON array, one entry per object:
// {"ok": true} or {"ok": false, "errors": [...]}; {"missing": "..."} when no package
// has a model for that apiVersion/kind.
import { readFileSync } from "node:fs";

const PACKAGES = {
  "networking.istio.io": "@kubernetes-models/istio",
  "security.istio.io": "@kubernetes-models/istio",
  "install.istio.io": "@kubernetes-models/istio",
  "gateway.envoyproxy.io": "@kubernetes-models/envoy-gateway",
  "gateway.networking.k8s.io": "@kubernetes-models/gateway-api",
  "monitoring.coreos.com": "@kubernetes-models/prometheus-operator",
  "cert-manager.io": "@kubernetes-models/cert-manager",
};

async function check(obj) {
  const [group, version] = obj.apiVersion.split("/");
  const pkg = PACKAGES[group];
  if (!pkg) return { missing: `${obj.apiVersion}/${obj.kind}: no package` };
  let mod;
  try {
    mod = await import(`${pkg}/${group}/${version}`);
  } catch (err) {
    return { missing: `${obj.apiVersion}: ${err.message}` };
  }
  const Model = mod[obj.kind];
  if (!Model) return { missing: `${obj.apiVersion}/${obj.kind}: not in ${pkg}` };
  try {
    new Model(obj).validate();
    return { ok: true };
  } catch (err) {
    return { ok: false, errors: (err.errors || [err.message]).map((e) => JSON.stringify(e)) };
  }
}

const objs = JSON.parse(readFileSync(0, "utf8"));
const out = [];
for (const obj of objs) out.push(await check(obj));
process.stdout.write(JSON.stringify(out));
