// The page's controls: messages, status line, camera presets, coefficient sliders, playback and
// sequence loading. It only touches the DOM; the viewer (main.js) passes in callbacks.

const $ = (id) => document.getElementById(id);

/** An error (red) or warning (yellow) message in the page; `null` hides it. */
export function showMessage(text, kind = "error") {
  const box = $("message");
  box.hidden = !text;
  box.textContent = text ?? "";
  box.className = kind;
}

export function setStatus(text) {
  $("status").textContent = text;
}

export function setFrameText(text) {
  $("frame").textContent = text;
}

function megabytes(bytes) {
  return `${(bytes / 1e6).toFixed(2)} MB`;
}

/** Wire every control to `actions` (see main.js); returns the functions that update them. */
export function buildControls(model, bytes, sliderCount, actions) {
  $("view-controls").hidden = false;
  const cameraSelect = $("camera");
  model.cameras.forEach((c, i) => cameraSelect.add(new Option(`${c.label} (${c.width}×${c.height})`, String(i))));
  cameraSelect.value = String(model.defaultCamera);
  cameraSelect.addEventListener("change", () => actions.selectCamera(Number(cameraSelect.value)));
  $("reset").addEventListener("click", () => actions.reset());
  $("play-training").addEventListener("click", () => actions.togglePlay("training"));
  $("follow-pose").addEventListener("change", (e) => actions.followPose(e.target.checked));
  $("play-sequence").addEventListener("click", () => actions.togglePlay("sequence"));
  const sequenceSelect = $("sequence");
  sequenceSelect.addEventListener("change", () => actions.selectSequence(Number(sequenceSelect.value)));
  $("sequence-file").addEventListener("change", (e) => {
    if (e.target.files.length) actions.loadSequence(e.target.files[0]);
  });

  const sliders = [];
  const container = $("sliders");
  let offset = 0;
  for (const m of model.modalities) {
    const heading = document.createElement("h2");
    heading.textContent = `${m.name} (${Math.min(sliderCount, m.components)} of ${m.components} components, ±${model.limit}σ)`;
    container.append(heading);
    for (let j = 0; j < Math.min(sliderCount, m.components); ++j) {
      const index = offset + j;
      const row = document.createElement("label");
      row.className = "slider";
      const input = Object.assign(document.createElement("input"), {
        type: "range", min: -model.limit, max: model.limit, step: 0.01, value: 0, id: `slider-${m.name}-${j}`,
      });
      const out = document.createElement("output");
      out.textContent = "0.00";
      row.append(`${m.name.slice(0, 3)} ${j + 1}`, input, out);
      input.addEventListener("input", () => {
        out.textContent = Number(input.value).toFixed(2);
        actions.setCoefficient(index, Number(input.value));
      });
      container.append(row);
      sliders.push({ index, input, out });
    }
    offset += m.components;
  }

  const sizeText = `${model.n.toLocaleString()} Gaussians · ${model.total} coefficients · model ${megabytes(bytes)} (${model.dtype})`;
  return {
    sizeText,
    showCoefficients(k) {
      for (const s of sliders) {
        s.input.value = String(k[s.index]);
        s.out.textContent = k[s.index].toFixed(2);
      }
    },
    showCamera(index) { cameraSelect.value = String(index); },
    showPlaying(kind) {
      $("play-training").textContent = kind === "training" ? "Pause" : "Play training";
      $("play-sequence").textContent = kind === "sequence" ? "Pause" : "Play";
    },
    addSequence(name, frames, index) {
      if (sequenceSelect.disabled) { sequenceSelect.textContent = ""; sequenceSelect.disabled = false; }
      sequenceSelect.add(new Option(`${name} (${frames} frames)`, String(index)));
      sequenceSelect.value = String(index);
      $("play-sequence").disabled = false;
    },
  };
}

/** Orbit by dragging, zoom by the wheel; `changed` is called after each move. */
export function attachOrbit(canvas, getCamera, changed) {
  let last = null;
  canvas.addEventListener("pointerdown", (e) => { last = [e.clientX, e.clientY]; canvas.setPointerCapture(e.pointerId); });
  canvas.addEventListener("pointerup", () => { last = null; });
  canvas.addEventListener("pointermove", (e) => {
    if (!last) return;
    getCamera().drag(e.clientX - last[0], e.clientY - last[1]);
    last = [e.clientX, e.clientY];
    changed();
  });
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault();
    getCamera().zoom(Math.sign(e.deltaY));
    changed();
  }, { passive: false });
}
