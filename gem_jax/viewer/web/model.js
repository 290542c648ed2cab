// Loading and checking a web export: model.json (manifest) + model.bin (arrays), the layout
// written by gem_jax/viewer/webexport.py (docs/architecture.md §11). Every problem becomes a
// ModelError whose message names the file, the field and what was expected (§10).

export const FORMAT = "gem_jax-web";
export const FORMAT_VERSION = 1;
export const MODALITIES = [["position", 3], ["rotation", 4], ["scale", 3], ["opacity", 1]];
const TYPES = { float32: [Float32Array, 4], float16: [Uint16Array, 2], int32: [Int32Array, 4] };

export class ModelError extends Error {}

function fail(where, text) {
  throw new ModelError(`${where}: ${text}`);
}

function isInt(v) {
  return Number.isInteger(v);
}

function matrix(where, name, value, rows, cols) {
  const ok = Array.isArray(value) && value.length === rows &&
    value.every((r) => Array.isArray(r) && r.length === cols && r.every((x) => typeof x === "number" && isFinite(x)));
  if (!ok) fail(where, `field '${name}' expected a finite ${rows}×${cols} matrix`);
  return value;
}

/** IEEE half floats (Uint16Array) to Float32Array. */
export function halfToFloat(h) {
  const out = new Float32Array(h.length);
  for (let i = 0; i < h.length; ++i) {
    const v = h[i], sign = v & 0x8000 ? -1 : 1, exp = (v >> 10) & 0x1f, frac = v & 0x3ff;
    if (exp === 0) out[i] = sign * frac * 2 ** -24;
    else if (exp === 31) out[i] = frac ? NaN : sign * Infinity;
    else out[i] = sign * (1 + frac / 1024) * 2 ** (exp - 15);
  }
  return out;
}

function array(where, manifest, buffer, name, shape, dtypes) {
  const entry = manifest.arrays[name];
  if (!entry || typeof entry !== "object") fail(where, `arrays.${name} is missing`);
  if (!dtypes.includes(entry.dtype)) fail(where, `arrays.${name} expected dtype ${dtypes.join(" or ")}, got ${entry.dtype}`);
  const got = entry.shape;
  if (!Array.isArray(got) || got.length !== shape.length || got.some((d, i) => d !== shape[i]))
    fail(where, `arrays.${name} expected shape [${shape.join(", ")}], got ${JSON.stringify(got)}`);
  const [Type, size] = TYPES[entry.dtype];
  const count = shape.reduce((a, b) => a * b, 1);
  if (!isInt(entry.offset) || entry.offset < 0 || entry.offset % size || entry.offset + count * size > buffer.byteLength)
    fail(where, `arrays.${name} (offset ${entry.offset}, ${count} × ${entry.dtype}) lies outside the ${buffer.byteLength}-byte binary`);
  const data = new Type(buffer, entry.offset, count);
  const values = entry.dtype === "float16" ? halfToFloat(data) : data;
  if (entry.dtype !== "int32") {
    for (let i = 0; i < values.length; ++i)
      if (!isFinite(values[i])) fail(where, `arrays.${name} has NaN/Inf values (index ${i})`);
  }
  return { data, values, dtype: entry.dtype };
}

/** Check the manifest and slice the binary; returns the model the renderer uploads. */
export function parseModel(where, manifest, buffer) {
  if (!manifest || typeof manifest !== "object") fail(where, "expected a JSON object");
  if (manifest.format !== FORMAT) fail(where, `field 'format' expected "${FORMAT}", got ${JSON.stringify(manifest.format)}`);
  if (manifest.format_version !== FORMAT_VERSION)
    fail(where, `format_version ${manifest.format_version} is not supported (this page reads ${FORMAT_VERSION})`);
  if (!["float32", "float16"].includes(manifest.dtype)) fail(where, `field 'dtype' expected float32 or float16`);
  const n = manifest.num_gaussians;
  if (!isInt(n) || n < 1) fail(where, `field 'num_gaussians' expected an integer >= 1`);
  const uv = manifest.uv_shape;
  if (!Array.isArray(uv) || uv.length !== 2 || !uv.every((v) => isInt(v) && v > 0)) fail(where, `field 'uv_shape' expected [H, W]`);
  if (!manifest.arrays || typeof manifest.arrays !== "object") fail(where, "field 'arrays' is missing");
  if (manifest.binary_bytes !== buffer.byteLength)
    fail(where, `binary_bytes ${manifest.binary_bytes} but ${manifest.binary} has ${buffer.byteLength} bytes`);
  const mods = manifest.modalities;
  if (!Array.isArray(mods) || mods.length !== 4 || mods.some((m, i) => m.name !== MODALITIES[i][0] || m.channels !== MODALITIES[i][1]))
    fail(where, `field 'modalities' expected ${JSON.stringify(MODALITIES.map(([name, channels]) => ({ name, channels })))}`);
  const store = [manifest.dtype];
  const modalities = mods.map((m) => {
    const k = m.components, d = n * m.channels;
    if (!isInt(k) || k < 1) fail(where, `modalities.${m.name}.components expected an integer >= 1`);
    const sigma = array(where, manifest, buffer, `${m.name}_sigma`, [k], ["float32"]).values;
    if (!sigma.every((s) => s > 0)) fail(where, `arrays.${m.name}_sigma must be positive`);
    return {
      name: m.name, channels: m.channels, components: k, sigma,
      mean: array(where, manifest, buffer, `${m.name}_mean`, [d], store),
      U: array(where, manifest, buffer, `${m.name}_U`, [k, d], store),
    };
  });
  const total = modalities.reduce((a, m) => a + m.components, 0);
  if (manifest.total_components !== total) fail(where, `field 'total_components' expected ${total}`);
  const texels = array(where, manifest, buffer, "texels", [n, 2], ["int32"]).values;
  for (let i = 0; i < n; ++i)
    if (texels[2 * i] < 0 || texels[2 * i] >= uv[0] || texels[2 * i + 1] < 0 || texels[2 * i + 1] >= uv[1])
      fail(where, `arrays.texels must index the uv_shape [${uv}] grid (Gaussian ${i})`);
  const colors = array(where, manifest, buffer, "colors", [n, 3], store);
  const cams = manifest.cameras;
  if (!Array.isArray(cams) || cams.length < 1) fail(where, "field 'cameras' expected a non-empty list");
  const cameras = cams.map((c, i) => {
    if (!isInt(c.width) || !isInt(c.height) || c.width < 1 || c.height < 1) fail(where, `cameras[${i}] expected positive integer width and height`);
    return { id: c.id, label: String(c.label ?? `camera ${c.id}`), width: c.width, height: c.height,
      viewmat: matrix(where, `cameras[${i}].viewmat`, c.viewmat, 4, 4), K: matrix(where, `cameras[${i}].K`, c.K, 3, 3) };
  });
  if (!isInt(manifest.default_camera) || manifest.default_camera < 0 || manifest.default_camera >= cameras.length)
    fail(where, `field 'default_camera' expected an index into the ${cameras.length} cameras`);
  const timesteps = manifest.training_timesteps;
  if (!Array.isArray(timesteps) || !timesteps.every(isInt)) fail(where, "field 'training_timesteps' expected a list of integers");
  const t = timesteps.length;
  const training = {
    timesteps,
    coefficients: array(where, manifest, buffer, "training_coefficients", [t, total], ["float32"]).values,
    roots: array(where, manifest, buffer, "training_roots", [t, 4, 4], ["float32"]).values,
    quats: array(where, manifest, buffer, "training_root_quats", [t, 4], ["float32"]).values,
  };
  const sequences = (manifest.sequences ?? []).map((s, i) => {
    const entry = manifest.arrays[s.array];
    const frames = entry && Array.isArray(entry.shape) ? entry.shape[0] : -1;
    return { name: String(s.name ?? `sequence ${i}`), frames,
      values: array(where, manifest, buffer, s.array, [frames, total], ["float32"]).values };
  });
  const neutral = matrix(where, "neutral_pose", manifest.neutral_pose, 4, 4);
  const nq = manifest.neutral_pose_quat;
  if (!Array.isArray(nq) || nq.length !== 4 || !nq.every(Number.isFinite)) fail(where, "field 'neutral_pose_quat' expected 4 numbers (wxyz)");
  return {
    n, uvShape: uv, dtype: manifest.dtype, modalities, total, colors, cameras,
    defaultCamera: manifest.default_camera, training, sequences,
    neutralPose: { matrix: neutral, quat: nq },
    limit: typeof manifest.coefficient_limit === "number" ? manifest.coefficient_limit : 3,
  };
}

async function fetchOk(url, what) {
  let response;
  try {
    response = await fetch(url);
  } catch (err) {
    throw new ModelError(`${url}: could not be fetched (${err.message})`);
  }
  if (!response.ok) throw new ModelError(`${what} not found: ${url} (HTTP ${response.status})`);
  return response;
}

/** Fetch model.json and its binary, check them; returns {model, bytes}. */
export async function loadModel(manifestUrl) {
  const response = await fetchOk(manifestUrl, "Model");
  const text = await response.text();
  let manifest;
  try {
    manifest = JSON.parse(text);
  } catch (err) {
    throw new ModelError(`${manifestUrl}: not valid JSON (${err.message})`);
  }
  if (!manifest || typeof manifest.binary !== "string") fail(manifestUrl, "field 'binary' (the model's binary file) is missing");
  const binUrl = new URL(manifest.binary, new URL(manifestUrl, location.href)).href;
  const buffer = await (await fetchOk(binUrl, "Model binary")).arrayBuffer();
  return { model: parseModel(manifestUrl, manifest, buffer), bytes: text.length + buffer.byteLength };
}
