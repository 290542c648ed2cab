// Cameras of the page: a preset (one of the subject's cameras: world→camera `viewmat` in OpenCV
// axes, intrinsics K, image size — docs/architecture.md §3) turned about the head by an orbit
// and moved along its axis by a zoom. Matrices are row-major Float64Array(16) / (9).

export function fromRows(rows) {
  return Float64Array.from(rows.flat());
}

export function multiply(a, b) {  // 4×4 row-major a·b
  const out = new Float64Array(16);
  for (let r = 0; r < 4; ++r)
    for (let c = 0; c < 4; ++c) {
      let s = 0;
      for (let i = 0; i < 4; ++i) s += a[4 * r + i] * b[4 * i + c];
      out[4 * r + c] = s;
    }
  return out;
}

export function transformPoint(m, p) {
  return [0, 1, 2].map((r) => m[4 * r] * p[0] + m[4 * r + 1] * p[1] + m[4 * r + 2] * p[2] + m[4 * r + 3]);
}

function translation(x, y, z) {
  return Float64Array.from([1, 0, 0, x, 0, 1, 0, y, 0, 0, 1, z, 0, 0, 0, 1]);
}

function rotationX(a) {
  const c = Math.cos(a), s = Math.sin(a);
  return Float64Array.from([1, 0, 0, 0, 0, c, -s, 0, 0, s, c, 0, 0, 0, 0, 1]);
}

function rotationY(a) {
  const c = Math.cos(a), s = Math.sin(a);
  return Float64Array.from([c, 0, s, 0, 0, 1, 0, 0, -s, 0, c, 0, 0, 0, 0, 1]);
}

/** Column-major Float32Array of a row-major 4×4 (for uniformMatrix4fv). */
export function columnMajor4(m) {
  const out = new Float32Array(16);
  for (let r = 0; r < 4; ++r) for (let c = 0; c < 4; ++c) out[4 * c + r] = m[4 * r + c];
  return out;
}

/** Column-major Float32Array of the rotation block of a row-major 4×4 (for uniformMatrix3fv). */
export function columnMajor3(m) {
  const out = new Float32Array(9);
  for (let r = 0; r < 3; ++r) for (let c = 0; c < 3; ++c) out[3 * c + r] = m[4 * r + c];
  return out;
}

/** A preset camera with an orbit about `centre` (world) and a zoom along the view axis. */
export class OrbitCamera {
  constructor(preset, centre, scale = 1) {
    this.preset = preset;
    this.base = fromRows(preset.viewmat);
    this.centre = centre;
    this.scale = scale;
    this.reset();
  }

  reset() {
    this.yaw = 0;
    this.pitch = 0;
    this.dolly = 0;
  }

  get width() { return Math.max(1, Math.round(this.preset.width * this.scale)); }
  get height() { return Math.max(1, Math.round(this.preset.height * this.scale)); }

  /** fx, fy, cx, cy of the rendered image (the preset's K scaled with the image). */
  intrinsics() {
    const K = this.preset.K, sx = this.width / this.preset.width, sy = this.height / this.preset.height;
    return [K[0][0] * sx, K[1][1] * sy, K[0][2] * sx, K[1][2] * sy];
  }

  /** World→camera: turn the scene about the centre in camera axes, then move along z. */
  viewmat() {
    if (this.yaw === 0 && this.pitch === 0 && this.dolly === 0) return this.base;
    const c = transformPoint(this.base, this.centre);
    const turn = multiply(translation(c[0], c[1], c[2] + this.dolly),
      multiply(rotationX(this.pitch), multiply(rotationY(this.yaw), translation(-c[0], -c[1], -c[2]))));
    return multiply(turn, this.base);
  }

  /** Distance from the camera to the centre (for zoom steps). */
  distance() {
    return Math.abs(transformPoint(this.base, this.centre)[2] + this.dolly);
  }

  drag(dx, dy) {  // pixels
    this.yaw -= dx * 0.01;
    this.pitch = Math.max(-1.5, Math.min(1.5, this.pitch + dy * 0.01));
  }

  zoom(steps) {  // wheel steps (positive: away)
    const d = transformPoint(this.base, this.centre)[2];
    this.dolly = Math.max(-0.9 * d, this.dolly + steps * 0.1 * this.distance());
  }
}
