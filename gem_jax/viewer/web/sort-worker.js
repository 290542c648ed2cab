// Depth order of the Gaussians, off the main thread (docs/architecture.md §11).
//
// The worker holds the position modality (mean (N·3), U (K, N·3)). For a request
// {version, kSigma (K), w (3), c0} it computes each Gaussian's camera depth
//     z_i = w · (mean_i + Σ_j kσ_j U_j,i) + c0,     w = Rᵀ v₂, c0 = v₂ · t + V₂₃
// (v₂ the third row of the world→camera rotation V, R|t the head's root pose), keeps the
// Gaussians in front of the near plane (z ≥ 0.01, as gem_jax/render/project.py) and sorts them
// front to back with a stable LSD radix sort on the float32 bits of z (monotonic for positive
// floats), so ties keep index order — the (depth, id) order of gem_jax/render/tiles.py.

const NEAR_PLANE = 0.01;
let n = 0, k = 0, mean = null, basis = null;
let z = null, keys = null, ids = null, tmpKeys = null, tmpIds = null, counts = new Uint32Array(65536);

function radixPass(srcKeys, srcIds, dstKeys, dstIds, count, shift) {
  counts.fill(0);
  for (let i = 0; i < count; ++i) counts[(srcKeys[i] >>> shift) & 0xffff] += 1;
  let sum = 0;
  for (let b = 0; b < 65536; ++b) { const c = counts[b]; counts[b] = sum; sum += c; }
  for (let i = 0; i < count; ++i) {
    const slot = counts[(srcKeys[i] >>> shift) & 0xffff]++;
    dstKeys[slot] = srcKeys[i];
    dstIds[slot] = srcIds[i];
  }
}

function depthOrder(kSigma, w, c0) {
  const [w0, w1, w2] = w;
  for (let i = 0; i < n; ++i) z[i] = w0 * mean[3 * i] + w1 * mean[3 * i + 1] + w2 * mean[3 * i + 2] + c0;
  for (let j = 0; j < k; ++j) {
    const s = kSigma[j];
    if (s === 0) continue;
    const row = basis.subarray(j * 3 * n, (j + 1) * 3 * n);
    for (let i = 0; i < n; ++i) z[i] += s * (w0 * row[3 * i] + w1 * row[3 * i + 1] + w2 * row[3 * i + 2]);
  }
  const zf = new Float32Array(1), zbits = new Uint32Array(zf.buffer);
  let count = 0;
  for (let i = 0; i < n; ++i) {
    if (!(z[i] >= NEAR_PLANE)) continue;
    zf[0] = z[i];
    keys[count] = zbits[0];
    ids[count] = i;
    count += 1;
  }
  radixPass(keys, ids, tmpKeys, tmpIds, count, 0);
  radixPass(tmpKeys, tmpIds, keys, ids, count, 16);
  return ids.slice(0, count);
}

self.onmessage = (event) => {
  const msg = event.data;
  if (msg.type === "init") {
    ({ n, k, mean, basis } = msg);
    z = new Float64Array(n);
    keys = new Uint32Array(n); ids = new Uint32Array(n);
    tmpKeys = new Uint32Array(n); tmpIds = new Uint32Array(n);
  } else if (msg.type === "sort") {
    const start = performance.now();
    const order = depthOrder(msg.kSigma, msg.w, msg.c0);
    self.postMessage({ type: "order", version: msg.version, order, ms: performance.now() - start }, [order.buffer]);
  }
};
