// WebGL2 renderer of a GEM (docs/architecture.md §11): the eigen model evaluated in a shader into
// float textures, splatted in depth order into a float render target, composited over the
// background into the canvas. The passes are described in shaders.js.

import { COMPOSITE_FS, EVAL_FS, EVAL_VS, SPLAT_FS, SPLAT_VS } from "./shaders.js";
import { columnMajor3, columnMajor4 } from "./camera.js";

export class RendererError extends Error {}

const MAX_LAYOUT_WIDTH = 2048;  // Gaussians per texture row (WebGL2 guarantees 2048² textures)

/** The canvas's WebGL2 context, or a RendererError saying what is missing. */
export function createContext(canvas) {
  const gl = canvas.getContext("webgl2", { alpha: false, antialias: false, depth: false, stencil: false,
    premultipliedAlpha: false, preserveDrawingBuffer: true, powerPreference: "high-performance" });
  if (!gl) throw new RendererError("This browser does not support WebGL2 (or it is disabled), which the GEM viewer needs. " +
    "Use a recent Chrome, Edge, Firefox or Safari with hardware acceleration on.");
  if (!gl.getExtension("EXT_color_buffer_float"))
    throw new RendererError("This browser's WebGL2 cannot render to float textures (EXT_color_buffer_float is missing).");
  return gl;
}

function compile(gl, type, source, name) {
  const shader = gl.createShader(type);
  gl.shaderSource(shader, source);
  gl.compileShader(shader);
  if (!gl.getShaderParameter(shader, gl.COMPILE_STATUS))
    throw new RendererError(`${name} shader failed to compile: ${gl.getShaderInfoLog(shader)}`);
  return shader;
}

function program(gl, vs, fs, name) {
  const p = gl.createProgram();
  gl.attachShader(p, compile(gl, gl.VERTEX_SHADER, vs, name));
  gl.attachShader(p, compile(gl, gl.FRAGMENT_SHADER, fs, name));
  gl.linkProgram(p);
  if (!gl.getProgramParameter(p, gl.LINK_STATUS)) throw new RendererError(`${name} program failed to link: ${gl.getProgramInfoLog(p)}`);
  const uniforms = {};
  for (let i = 0; i < gl.getProgramParameter(p, gl.ACTIVE_UNIFORMS); ++i) {
    const uniform = gl.getActiveUniform(p, i).name.replace(/\[0\]$/, "");
    uniforms[uniform] = gl.getUniformLocation(p, uniform);
  }
  return { program: p, uniforms };
}

function textureFormat(gl, channels, dtype) {
  const half = dtype === "float16";
  const table = {
    1: [half ? gl.R16F : gl.R32F, gl.RED],
    3: [half ? gl.RGB16F : gl.RGB32F, gl.RGB],
    4: [half ? gl.RGBA16F : gl.RGBA32F, gl.RGBA],
  };
  return [...table[channels], half ? gl.HALF_FLOAT : gl.FLOAT];
}

function nearest(gl, target) {
  gl.texParameteri(target, gl.TEXTURE_MIN_FILTER, gl.NEAREST);
  gl.texParameteri(target, gl.TEXTURE_MAG_FILTER, gl.NEAREST);
  gl.texParameteri(target, gl.TEXTURE_WRAP_S, gl.CLAMP_TO_EDGE);
  gl.texParameteri(target, gl.TEXTURE_WRAP_T, gl.CLAMP_TO_EDGE);
}

export class Renderer {
  constructor(gl, model) {
    this.gl = gl;
    this.model = model;
    this.n = model.n;
    this.width = Math.min(model.n, MAX_LAYOUT_WIDTH);
    this.rows = Math.ceil(model.n / this.width);
    this.accumFormat = gl.getExtension("EXT_float_blend") ? gl.RGBA32F : gl.RGBA16F;
    this.programs = {
      eval: program(gl, EVAL_VS, EVAL_FS, "evaluation"),
      splat: program(gl, SPLAT_VS, SPLAT_FS, "splatting"),
      composite: program(gl, EVAL_VS, COMPOSITE_FS, "composite"),
    };
    gl.pixelStorei(gl.UNPACK_ALIGNMENT, 1);
    this.bases = model.modalities.map((m) => this.uploadBasis(m));
    this.colors = this.texture2d(3, model.dtype, model.colors.data);
    this.coef = gl.createTexture();
    gl.bindTexture(gl.TEXTURE_2D, this.coef);
    nearest(gl, gl.TEXTURE_2D);
    gl.texStorage2D(gl.TEXTURE_2D, 1, gl.R32F, model.total, 1);
    this.offsets = [];
    model.modalities.reduce((offset, m) => { this.offsets.push(offset); return offset + m.components; }, 0);
    // evaluated Gaussians: world mean, world quaternion, scale + opacity
    this.gaussians = [0, 1, 2].map(() => this.texture2d(4, "float32", null));
    this.evalFbo = gl.createFramebuffer();
    gl.bindFramebuffer(gl.FRAMEBUFFER, this.evalFbo);
    this.gaussians.forEach((t, i) => gl.framebufferTexture2D(gl.FRAMEBUFFER, gl.COLOR_ATTACHMENT0 + i, gl.TEXTURE_2D, t, 0));
    gl.drawBuffers([gl.COLOR_ATTACHMENT0, gl.COLOR_ATTACHMENT1, gl.COLOR_ATTACHMENT2]);
    this.checkFramebuffer("evaluation");
    this.emptyVao = gl.createVertexArray();
    this.splatVao = gl.createVertexArray();
    this.orderBuffer = gl.createBuffer();
    gl.bindVertexArray(this.splatVao);
    gl.bindBuffer(gl.ARRAY_BUFFER, this.orderBuffer);
    gl.enableVertexAttribArray(0);
    gl.vertexAttribIPointer(0, 1, gl.UNSIGNED_INT, 0, 0);
    gl.vertexAttribDivisor(0, 1);
    gl.bindVertexArray(null);
    this.count = 0;
    this.accum = null;
  }

  checkFramebuffer(name) {
    const gl = this.gl;
    const status = gl.checkFramebufferStatus(gl.FRAMEBUFFER);
    if (status !== gl.FRAMEBUFFER_COMPLETE) throw new RendererError(`the ${name} render target is incomplete (status 0x${status.toString(16)})`);
  }

  texture2d(channels, dtype, data) {
    const gl = this.gl;
    const [internal, format, type] = textureFormat(gl, channels, dtype);
    const t = gl.createTexture();
    gl.bindTexture(gl.TEXTURE_2D, t);
    nearest(gl, gl.TEXTURE_2D);
    gl.texStorage2D(gl.TEXTURE_2D, 1, internal, this.width, this.rows);
    if (data) {
      const padded = new data.constructor(this.width * this.rows * channels);
      padded.set(data);
      gl.texSubImage2D(gl.TEXTURE_2D, 0, 0, 0, this.width, this.rows, format, type, padded);
    }
    return t;
  }

  /** Layer 0: the mean; layer j + 1: component j; Gaussian i at texel (i mod width, i div width). */
  uploadBasis(m) {
    const gl = this.gl;
    const [internal, format, type] = textureFormat(gl, m.channels, m.mean.dtype);
    const layer = this.width * this.rows * m.channels, d = this.n * m.channels;
    const data = new m.mean.data.constructor(layer * (m.components + 1));
    data.set(m.mean.data, 0);
    for (let j = 0; j < m.components; ++j) data.set(m.U.data.subarray(j * d, (j + 1) * d), (j + 1) * layer);
    const t = gl.createTexture();
    gl.bindTexture(gl.TEXTURE_2D_ARRAY, t);
    nearest(gl, gl.TEXTURE_2D_ARRAY);
    gl.texStorage3D(gl.TEXTURE_2D_ARRAY, 1, internal, this.width, this.rows, m.components + 1);
    gl.texSubImage3D(gl.TEXTURE_2D_ARRAY, 0, 0, 0, 0, this.width, this.rows, m.components + 1, format, type, data);
    return t;
  }

  /** Evaluate G(k) posed by `pose` ({matrix: row-major 4×4 (Float64Array or rows), quat: wxyz}).
   *  `kSigma` is k·σ (ΣK values, modalities in order). */
  evaluate(kSigma, pose) {
    const gl = this.gl, { program: p, uniforms: u } = this.programs.eval;
    gl.bindTexture(gl.TEXTURE_2D, this.coef);
    gl.texSubImage2D(gl.TEXTURE_2D, 0, 0, 0, this.model.total, 1, gl.RED, gl.FLOAT, Float32Array.from(kSigma));
    gl.bindFramebuffer(gl.FRAMEBUFFER, this.evalFbo);
    gl.viewport(0, 0, this.width, this.rows);
    gl.disable(gl.BLEND);
    gl.useProgram(p);
    this.bases.forEach((t, i) => { gl.activeTexture(gl.TEXTURE0 + i); gl.bindTexture(gl.TEXTURE_2D_ARRAY, t); });
    gl.activeTexture(gl.TEXTURE4);
    gl.bindTexture(gl.TEXTURE_2D, this.coef);
    gl.uniform1iv(u.uBasis, [0, 1, 2, 3]);
    gl.uniform1i(u.uCoef, 4);
    gl.uniform4iv(u.uK, this.model.modalities.map((m) => m.components));
    gl.uniform4iv(u.uOffset, this.offsets);
    gl.uniform1i(u.uN, this.n);
    gl.uniform1i(u.uWidth, this.width);
    const m = Float64Array.from(pose.matrix.flat ? pose.matrix.flat() : pose.matrix);
    gl.uniformMatrix3fv(u.uRootR, false, columnMajor3(m));
    gl.uniform3f(u.uRootT, m[3], m[7], m[11]);
    gl.uniform4fv(u.uRootQ, Float32Array.from(pose.quat));
    gl.bindVertexArray(this.emptyVao);
    gl.drawArrays(gl.TRIANGLES, 0, 3);
  }

  /** The Gaussian ids to draw, front to back (from the sort worker). */
  setOrder(order) {
    const gl = this.gl;
    gl.bindBuffer(gl.ARRAY_BUFFER, this.orderBuffer);
    gl.bufferData(gl.ARRAY_BUFFER, order, gl.DYNAMIC_DRAW);
    this.count = order.length;
  }

  ensureTarget(width, height) {
    const gl = this.gl;
    if (this.accum && this.accum.width === width && this.accum.height === height) return;
    if (this.accum) { gl.deleteTexture(this.accum.texture); gl.deleteFramebuffer(this.accum.fbo); }
    const texture = gl.createTexture();
    gl.bindTexture(gl.TEXTURE_2D, texture);
    nearest(gl, gl.TEXTURE_2D);
    gl.texStorage2D(gl.TEXTURE_2D, 1, this.accumFormat, width, height);
    const fbo = gl.createFramebuffer();
    gl.bindFramebuffer(gl.FRAMEBUFFER, fbo);
    gl.framebufferTexture2D(gl.FRAMEBUFFER, gl.COLOR_ATTACHMENT0, gl.TEXTURE_2D, texture, 0);
    this.checkFramebuffer("splatting");
    this.accum = { texture, fbo, width, height };
  }

  /** Splat the evaluated Gaussians seen by `view` (row-major world→camera) with intrinsics
   *  [fx, fy, cx, cy] into a width×height image over `background`, shown in the canvas. */
  draw(view, intrinsics, width, height, background) {
    const gl = this.gl;
    this.ensureTarget(width, height);
    gl.bindFramebuffer(gl.FRAMEBUFFER, this.accum.fbo);
    gl.viewport(0, 0, width, height);
    gl.clearColor(0, 0, 0, 0);
    gl.clear(gl.COLOR_BUFFER_BIT);
    const { program: p, uniforms: u } = this.programs.splat;
    gl.useProgram(p);
    this.gaussians.forEach((t, i) => { gl.activeTexture(gl.TEXTURE0 + i); gl.bindTexture(gl.TEXTURE_2D, t); });
    gl.activeTexture(gl.TEXTURE3);
    gl.bindTexture(gl.TEXTURE_2D, this.colors);
    gl.uniform1i(u.uMean, 0);
    gl.uniform1i(u.uQuat, 1);
    gl.uniform1i(u.uScaleOpacity, 2);
    gl.uniform1i(u.uColor, 3);
    gl.uniform1i(u.uWidth, this.width);
    gl.uniformMatrix4fv(u.uView, false, columnMajor4(view));
    gl.uniform4fv(u.uIntrinsics, Float32Array.from(intrinsics));
    gl.uniform2f(u.uImage, width, height);
    gl.enable(gl.BLEND);
    gl.blendEquation(gl.FUNC_ADD);
    gl.blendFuncSeparate(gl.ONE_MINUS_DST_ALPHA, gl.ONE, gl.ONE_MINUS_DST_ALPHA, gl.ONE);  // front to back
    gl.bindVertexArray(this.splatVao);
    if (this.count) gl.drawArraysInstanced(gl.TRIANGLE_STRIP, 0, 4, this.count);
    gl.disable(gl.BLEND);
    // composite into the canvas
    const canvas = gl.canvas;
    if (canvas.width !== width || canvas.height !== height) { canvas.width = width; canvas.height = height; }
    gl.bindFramebuffer(gl.FRAMEBUFFER, null);
    gl.viewport(0, 0, width, height);
    const c = this.programs.composite;
    gl.useProgram(c.program);
    gl.activeTexture(gl.TEXTURE0);
    gl.bindTexture(gl.TEXTURE_2D, this.accum.texture);
    gl.uniform1i(c.uniforms.uAccum, 0);
    gl.uniform3fv(c.uniforms.uBackground, Float32Array.from(background));
    gl.bindVertexArray(this.emptyVao);
    gl.drawArrays(gl.TRIANGLES, 0, 3);
    gl.bindVertexArray(null);
  }

  /** RGBA of a framebuffer as top-down rows (GL's rows go bottom-up); waits for the GPU. */
  readTopDown(fbo, w, h, Type, type) {
    const gl = this.gl;
    gl.bindFramebuffer(gl.FRAMEBUFFER, fbo);
    const bottomUp = new Type(w * h * 4);
    gl.readPixels(0, 0, w, h, gl.RGBA, type, bottomUp);
    const out = new Type(w * h * 4);
    for (let y = 0; y < h; ++y) out.set(bottomUp.subarray((h - 1 - y) * w * 4, (h - y) * w * 4), y * w * 4);
    return out;
  }

  /** The canvas as top-down RGBA bytes. */
  readPixels() {
    const canvas = this.gl.canvas;
    return this.readTopDown(null, canvas.width, canvas.height, Uint8Array, this.gl.UNSIGNED_BYTE);
  }

  /** The float render target as top-down RGBA floats (rgb = Σ T·α·c, a = 1 − T). */
  readAccumulation() {
    return this.readTopDown(this.accum.fbo, this.accum.width, this.accum.height, Float32Array, this.gl.FLOAT);
  }

  /** Block until the GPU has finished (benchmarks): read one pixel. */
  finish() {
    const gl = this.gl;
    gl.bindFramebuffer(gl.FRAMEBUFFER, null);
    gl.readPixels(0, 0, 1, 1, gl.RGBA, gl.UNSIGNED_BYTE, new Uint8Array(4));
  }

  info() {
    const gl = this.gl, debug = gl.getExtension("WEBGL_debug_renderer_info");
    return {
      renderer: debug ? gl.getParameter(debug.UNMASKED_RENDERER_WEBGL) : gl.getParameter(gl.RENDERER),
      accumulation: this.accumFormat === gl.RGBA32F ? "RGBA32F" : "RGBA16F",
      layout: [this.width, this.rows],
    };
  }
}
