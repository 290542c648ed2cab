// The GEM viewer page (docs/architecture.md §11): loads model.json + model.bin, evaluates
// G(k) = mean + (k·σ) @ U on the GPU each time k or the head pose changes, sorts by depth in a
// Web Worker and splats as gem_jax.render.rasterize does. URL parameters: `model` (manifest URL,
// default model.json), `camera` (preset index), `scale` (render size / camera size, default:
// fit the window), `sliders` (per modality, default 5), `fps` (playback rate, default 25).
//
// window.gemViewer is the page's programmatic interface (the tests and benchmarks use it):
// ready, error, info(), setCoefficients(k), coefficients(), setPose("neutral" | timestep index),
// setCamera(index), settled(), readPixels(), readAccumulation(), benchmark(options).

import { OrbitCamera, transformPoint } from "./camera.js";
import { ModelError, loadModel } from "./model.js";
import { Renderer, createContext } from "./renderer.js";
import { checkSequence, readSequenceFile } from "./sequence.js";
import { attachOrbit, buildControls, setFrameText, setStatus, showMessage } from "./ui.js";

const params = new URLSearchParams(location.search);
const BACKGROUND = [1, 1, 1];  // white, as the evaluation (docs/architecture.md §8)

class Viewer {
  constructor(model, bytes, renderer) {
    this.model = model;
    this.renderer = renderer;
    this.k = new Float32Array(model.total);
    this.sigma = Float32Array.from(model.modalities.flatMap((m) => Array.from(m.sigma)));
    this.pose = model.neutralPose;
    this.followPose = false;
    this.version = 0;          // any change of k, pose or camera
    this.evaluated = -1;       // version of (k, pose) in the Gaussian textures
    this.poseVersion = 0;      // bumps with k or pose
    this.orderVersion = -1;    // version the current depth order was computed for
    this.sortPending = false;
    this.waiters = [];
    this.sequences = model.sequences.map((s) => ({ ...s }));
    this.playing = null;
    this.frameTimes = [];
    this.drawCount = 0;
    this.sortMs = [];
    const p = model.modalities[0];
    const centre = [0, 1, 2].map((c) => {
      let s = 0;
      for (let i = 0; i < model.n; ++i) s += p.mean.values[3 * i + c];
      return s / model.n;
    });
    this.centre = transformPoint(Float64Array.from(model.neutralPose.matrix.flat()), centre);
    this.fps = Number(params.get("fps") ?? 25);
    this.worker = new Worker(new URL("./sort-worker.js", import.meta.url));
    this.worker.onmessage = (e) => this.onOrder(e.data);
    this.worker.onerror = (e) => this.fatal(`depth-sort worker failed: ${e.message}`);
    this.worker.postMessage({ type: "init", n: model.n, k: p.components, mean: Float32Array.from(p.mean.values),
      basis: Float32Array.from(p.U.values) });
    this.ui = buildControls(model, bytes, Number(params.get("sliders") ?? 5), this.actions());
    this.setCamera(Number(params.get("camera") ?? model.defaultCamera));
    attachOrbit(renderer.gl.canvas, () => this.camera, () => this.changed());
    for (const s of this.sequences) this.ui.addSequence(s.name, s.frames, this.sequences.indexOf(s));
    setStatus(this.ui.sizeText);
    requestAnimationFrame((t) => this.frame(t));
  }

  actions() {
    return {
      selectCamera: (i) => this.setCamera(i),
      reset: () => this.reset(),
      togglePlay: (kind) => this.togglePlay(kind),
      followPose: (on) => { this.followPose = on; if (!on) this.setPose("neutral"); },
      selectSequence: (i) => { this.sequenceIndex = i; },
      loadSequence: (file) => this.loadSequence(file),
      setCoefficient: (index, value) => { this.stop(); this.k[index] = value; this.kChanged(); },
    };
  }

  fatal(text) {
    showMessage(text, "error");
    document.documentElement.dataset.state = "error";
    window.gemViewer.error = text;
  }

  changed() {
    this.version += 1;
  }

  kChanged() {
    this.poseVersion += 1;
    this.changed();
  }

  /** Set k (σ units, ΣK values): non-finite is an error, beyond ±limit is clamped with a warning. */
  setCoefficients(k, where = "coefficients") {
    const { values, clamped, maxAbs } = checkSequence(where, { shape: [k.length], data: Float64Array.from(k) },
      this.model.total, this.model.limit);
    if (clamped) showMessage(`${where}: ${clamped} values beyond ±${this.model.limit}σ clamped (max |k| = ${maxAbs.toFixed(3)})`, "warning");
    this.k.set(values);
    this.ui.showCoefficients(this.k);
    this.kChanged();
  }

  setPose(which) {
    const t = this.model.training;
    if (which === "neutral") this.pose = this.model.neutralPose;
    else {
      if (!Number.isInteger(which) || which < 0 || which >= t.timesteps.length) throw new RangeError(`no training timestep row ${which}`);
      this.pose = { matrix: t.roots.subarray(16 * which, 16 * which + 16), quat: t.quats.subarray(4 * which, 4 * which + 4) };
    }
    this.kChanged();
  }

  setCamera(index) {
    const presets = this.model.cameras;
    if (!Number.isInteger(index) || index < 0 || index >= presets.length) throw new RangeError(`camera ${index}: the model has ${presets.length} cameras`);
    const preset = presets[index];
    let scale = Number(params.get("scale"));
    if (!(scale > 0)) {
      const stage = document.getElementById("stage");
      scale = Math.min((stage.clientWidth - 16) / preset.width, (stage.clientHeight - 16) / preset.height, 8);
    }
    this.camera = new OrbitCamera(preset, this.centre, scale);
    this.cameraIndex = index;
    this.ui.showCamera(index);
    this.changed();
  }

  reset() {
    this.stop();
    this.k.fill(0);
    this.ui.showCoefficients(this.k);
    this.pose = this.model.neutralPose;
    this.setCamera(this.cameraIndex);
    this.kChanged();
    showMessage(null);
    setFrameText("");
  }

  stop() {
    this.playing = null;
    this.ui.showPlaying(null);
  }

  togglePlay(kind) {
    if (this.playing && this.playing.kind === kind) { this.stop(); return; }
    if (kind === "training") {
      const t = this.model.training;
      this.playing = { kind, values: t.coefficients, frames: t.timesteps.length, start: performance.now(),
        label: (f) => `training timestep ${t.timesteps[f]} (${f + 1}/${t.timesteps.length})` };
    } else {
      const s = this.sequences[this.sequenceIndex ?? 0];
      if (!s) return;
      this.playing = { kind, values: s.values, frames: s.frames, start: performance.now(),
        label: (f) => `${s.name}: frame ${f + 1}/${s.frames}` };
    }
    this.ui.showPlaying(kind);
  }

  async loadSequence(file) {
    try {
      const s = await readSequenceFile(file, this.model.total, this.model.limit);
      this.sequences.push({ name: file.name, frames: s.frames, values: s.values });
      this.sequenceIndex = this.sequences.length - 1;
      this.ui.addSequence(file.name, s.frames, this.sequenceIndex);
      showMessage(s.clamped ? `${file.name}: ${s.clamped} coefficients beyond ±${this.model.limit}σ clamped ` +
        `(max |k| = ${s.maxAbs.toFixed(3)})` : null, "warning");
      this.stop();
      this.togglePlay("sequence");
    } catch (err) {
      showMessage(`Could not load ${file.name}: ${err.message}`, "error");
    }
  }

  advance(now) {
    const p = this.playing;
    const f = Math.floor(((now - p.start) / 1000) * this.fps) % p.frames;
    if (f === p.frame) return;
    p.frame = f;
    const total = this.model.total;
    this.k.set(p.values.subarray(f * total, (f + 1) * total));
    this.ui.showCoefficients(this.k);
    if (p.kind === "training" && this.followPose) this.setPose(f);
    else if (p.kind !== "training") this.pose = this.model.neutralPose;
    setFrameText(p.label(f));
    this.kChanged();
  }

  requestSort() {
    const view = this.camera.viewmat(), R = this.pose.matrix.flat ? this.pose.matrix.flat() : Array.from(this.pose.matrix);
    const v2 = [view[8], view[9], view[10]];
    const w = [0, 1, 2].map((c) => v2[0] * R[c] + v2[1] * R[4 + c] + v2[2] * R[8 + c]);
    const c0 = v2[0] * R[3] + v2[1] * R[7] + v2[2] * R[11] + view[11];
    const kSigma = new Float32Array(this.model.modalities[0].components);
    for (let j = 0; j < kSigma.length; ++j) kSigma[j] = this.k[j] * this.sigma[j];
    this.sortPending = true;
    this.worker.postMessage({ type: "sort", version: this.version, kSigma, w, c0 });
  }

  onOrder(msg) {
    this.sortPending = false;
    this.renderer.setOrder(msg.order);
    this.orderVersion = msg.version;
    this.sortMs.push(msg.ms);
    if (this.sortMs.length > 100) this.sortMs.shift();
  }

  kSigma() {
    return this.k.map((v, i) => v * this.sigma[i]);
  }

  /** One animation frame: advance playback, evaluate, sort, draw what is current. */
  frame(now) {
    requestAnimationFrame((t) => this.frame(t));
    if (this.playing) this.advance(now);
    this.showFps(now);
    if (this.drawn === this.version && this.orderVersion === this.version) return;
    if (this.evaluated !== this.poseVersion) {
      this.renderer.evaluate(this.kSigma(), this.pose);
      this.evaluated = this.poseVersion;
    }
    if (!this.sortPending && this.orderVersion !== this.version) this.requestSort();
    if (this.orderVersion < 0) return;
    const cam = this.camera;
    this.renderer.draw(cam.viewmat(), cam.intrinsics(), cam.width, cam.height, BACKGROUND);
    this.drawn = this.orderVersion === this.version ? this.version : -1;
    this.drawCount += 1;
    this.countFrame(now);
    if (this.drawn === this.version) {
      if (!window.gemViewer.ready) {
        window.gemViewer.ready = true;
        document.documentElement.dataset.state = "ready";
      }
      this.waiters.splice(0).forEach((resolve) => resolve());
    }
  }

  countFrame(now) {
    this.frameTimes.push(now);
  }

  /** Frames drawn in the last second (4 updates a second); "idle" when nothing changes. */
  showFps(now) {
    while (this.frameTimes.length && this.frameTimes[0] < now - 1000) this.frameTimes.shift();
    if (this.lastStatus && now - this.lastStatus < 250) return;
    this.lastStatus = now;
    const fps = this.frameTimes.length ? `${this.frameTimes.length} fps` : "idle";
    setStatus(`${fps} · ${this.ui.sizeText}`);
  }

  /** Resolves once a frame of the current state (k, pose, camera) is on the canvas. */
  settled() {
    if (this.drawn === this.version && this.orderVersion === this.version) return Promise.resolve();
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  /** Timings (ms, medians) of the evaluation and splat passes (GPU-synchronised), the worker's
   *  sort, and the frames per second of playback of random coefficients for `seconds`. */
  async benchmark({ frames = 20, seconds = 3, seed = 1 } = {}) {
    let state = seed >>> 0;
    const random = () => { state = (1664525 * state + 1013904223) >>> 0; return state / 2 ** 32; };
    const median = (xs) => xs.slice().sort((a, b) => a - b)[Math.floor(xs.length / 2)];
    const randomK = () => Float32Array.from({ length: this.model.total }, () => 2 * random() - 1);
    await this.settled();
    const cam = this.camera, evalMs = [], splatMs = [];
    for (let i = 0; i < frames + 2; ++i) {
      this.k.set(randomK());
      let t0 = performance.now();
      this.renderer.evaluate(this.kSigma(), this.pose);
      this.renderer.finish();
      let t1 = performance.now();
      this.renderer.draw(cam.viewmat(), cam.intrinsics(), cam.width, cam.height, BACKGROUND);
      this.renderer.finish();
      const t2 = performance.now();
      if (i >= 2) { evalMs.push(t1 - t0); splatMs.push(t2 - t1); }
    }
    const values = new Float32Array(this.model.total * 64).map(() => 2 * random() - 1);
    this.sortMs = [];
    const saved = this.fps;
    this.fps = 1e3;  // a new k at every animation frame
    this.playing = { kind: "benchmark", values, frames: 64, start: performance.now(), label: (f) => `benchmark frame ${f + 1}` };
    const count0 = this.drawCount, start = performance.now();
    await new Promise((resolve) => setTimeout(resolve, seconds * 1000));
    const playFps = (this.drawCount - count0) / ((performance.now() - start) / 1000);
    this.fps = saved;
    this.stop();
    this.k.fill(0);
    this.kChanged();
    await this.settled();
    return { evalMs: median(evalMs), splatMs: median(splatMs), sortMs: median(this.sortMs), playFps,
      gaussians: this.model.n, width: cam.width, height: cam.height };
  }
}

function base64(bytes) {
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

function api(viewer) {
  const v = () => {
    if (!viewer) throw new Error(window.gemViewer.error ?? "the viewer is not ready");
    return viewer;
  };
  return {
    info: () => ({ ...v().renderer.info(), gaussians: v().model.n, components: v().model.modalities.map((m) => m.components),
      dtype: v().model.dtype, camera: v().cameraIndex, width: v().camera.width, height: v().camera.height,
      intrinsics: v().camera.intrinsics(), viewmat: Array.from(v().camera.viewmat()) }),
    setCoefficients: (k) => v().setCoefficients(Array.from(k)),
    coefficients: () => Array.from(v().k),
    setPose: (which) => v().setPose(which),
    setCamera: (index) => v().setCamera(index),
    settled: () => v().settled(),
    readPixels: () => base64(v().renderer.readPixels()),
    readAccumulation: () => Array.from(v().renderer.readAccumulation()),
    benchmark: (options) => v().benchmark(options),
  };
}

async function start() {
  window.gemViewer = { ready: false, error: null };
  const manifestUrl = params.get("model") ?? "model.json";
  let viewer = null;
  try {
    const gl = createContext(document.getElementById("canvas"));
    setStatus(`loading ${manifestUrl}…`);
    const { model, bytes } = await loadModel(manifestUrl);
    viewer = new Viewer(model, bytes, new Renderer(gl, model));
  } catch (err) {
    const text = err instanceof ModelError
      ? `Malformed or missing model. ${err.message}\nExport one with: python -m gem_jax.export --workdir RUN --web DIR`
      : err.message;
    console.error(text);
    showMessage(text, "error");
    setStatus("no model shown");
    document.documentElement.dataset.state = "error";
    window.gemViewer.error = text;
  }
  Object.assign(window.gemViewer, api(viewer));
}

start();
