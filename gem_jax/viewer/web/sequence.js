// Coefficient sequences the page can play: the (F, ΣK) `<out>.npy` that `python -m gem_jax.reenact`
// writes (NumPy format 1.0–3.0, little-endian float32/float64, C order), or JSON of the same
// numbers — a list of F lists, or {"coefficients": [...]}. Policy (docs/architecture.md §10):
// non-finite values are an error, values beyond ±3σ are clamped with a warning.

export class SequenceError extends Error {}

const NPY_MAGIC = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59];  // \x93NUMPY

/** Parse a .npy file: returns {shape, data (Float64Array)}. */
export function parseNpy(name, buffer) {
  const bytes = new Uint8Array(buffer);
  if (bytes.length < 10 || NPY_MAGIC.some((b, i) => bytes[i] !== b)) throw new SequenceError(`${name}: not a .npy file (no \\x93NUMPY header)`);
  const major = bytes[6];
  const view = new DataView(buffer);
  const headerLen = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = new TextDecoder(major === 3 ? "utf-8" : "latin1").decode(bytes.subarray(start, start + headerLen));
  const descr = /'descr':\s*'([^']+)'/.exec(header);
  const fortran = /'fortran_order':\s*(True|False)/.exec(header);
  const shapeText = /'shape':\s*\(([^)]*)\)/.exec(header);
  if (!descr || !fortran || !shapeText) throw new SequenceError(`${name}: unreadable .npy header ${JSON.stringify(header)}`);
  if (fortran[1] === "True") throw new SequenceError(`${name}: Fortran-ordered arrays are not supported (save with np.save of a C-ordered array)`);
  const shape = shapeText[1].split(",").map((s) => s.trim()).filter((s) => s).map(Number);
  const count = shape.reduce((a, b) => a * b, 1);
  const offset = start + headerLen;
  const types = { "<f4": [Float32Array, 4], "<f8": [Float64Array, 8] };
  if (!(descr[1] in types)) throw new SequenceError(`${name}: dtype ${descr[1]} is not supported (expected little-endian float32 or float64)`);
  const [Type, size] = types[descr[1]];
  if (offset + count * size > buffer.byteLength) throw new SequenceError(`${name}: truncated (${count} values of ${size} bytes expected)`);
  return { shape, data: Float64Array.from(new Type(buffer.slice(offset, offset + count * size))) };
}

/** Parse the JSON form: returns {shape, data}. */
export function parseJsonSequence(name, text) {
  let value;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new SequenceError(`${name}: not valid JSON (${err.message})`);
  }
  if (value && !Array.isArray(value) && Array.isArray(value.coefficients)) value = value.coefficients;
  if (!Array.isArray(value) || !value.every((row) => Array.isArray(row)))
    throw new SequenceError(`${name}: expected a list of coefficient lists (F, ΣK), or {"coefficients": [...]}`);
  const width = value.length ? value[0].length : 0;
  if (value.some((row) => row.length !== width)) throw new SequenceError(`${name}: rows of different lengths`);
  const data = new Float64Array(value.length * width);
  value.forEach((row, f) => row.forEach((x, j) => { data[f * width + j] = typeof x === "number" ? x : NaN; }));
  return { shape: [value.length, width], data };
}

/** Check shape (F, total), reject non-finite values, clamp to ±limit.
 *  Returns {frames, values (Float32Array F·total), clamped (count), maxAbs}. */
export function checkSequence(name, parsed, total, limit) {
  let { shape, data } = parsed;
  if (shape.length === 1 && shape[0] === total) shape = [1, total];
  if (shape.length !== 2 || shape[1] !== total || shape[0] < 1)
    throw new SequenceError(`${name}: expected coefficients of shape (F, ${total}) for this model, got (${shape.join(", ")})`);
  let clamped = 0, maxAbs = 0;
  const values = new Float32Array(data.length);
  for (let i = 0; i < data.length; ++i) {
    const x = data[i];
    if (!Number.isFinite(x)) throw new SequenceError(`${name}: non-finite coefficient at frame ${Math.floor(i / total)}, column ${i % total}`);
    maxAbs = Math.max(maxAbs, Math.abs(x));
    if (Math.abs(x) > limit) clamped += 1;
    values[i] = Math.min(limit, Math.max(-limit, x));
  }
  return { frames: shape[0], values, clamped, maxAbs };
}

/** Read a File (from an <input type=file>) as a checked sequence. */
export async function readSequenceFile(file, total, limit) {
  const buffer = await file.arrayBuffer();
  const bytes = new Uint8Array(buffer);
  const isNpy = bytes.length >= 6 && NPY_MAGIC.every((b, i) => bytes[i] === b);
  const parsed = isNpy ? parseNpy(file.name, buffer) : parseJsonSequence(file.name, new TextDecoder().decode(bytes));
  return checkSequence(file.name, parsed, total, limit);
}
