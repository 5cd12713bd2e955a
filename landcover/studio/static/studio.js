// landcover-studio: imagery, the model's map and its confidence in the image's own pixel grid
// (Leaflet CRS.Simple: pixel (col, row) is at lat -row / 2^maxzoom, lng col / 2^maxzoom), and
// tools that send each stroke to the server as soon as it ends (a crash loses at most one).
"use strict";

const tab = sessionStorage.getItem("landcover-tab") || Math.random().toString(36).slice(2, 12);
sessionStorage.setItem("landcover-tab", tab);

let scene = null;
let map = null;
let scale = 1;
let selected = null;
let tool = "pan";
let radius = 4;
let correctionsDrawn = 0;
const layers = {};
let sketch = null;
let points = [];
let painting = false;

const $ = (id) => document.getElementById(id);

function say(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  };
  const answer = await fetch(path, options);
  const data = await answer.json().catch(() => ({}));
  if (!answer.ok) throw new Error(data.error || data.detail || `HTTP ${answer.status}`);
  return data;
}

const toPixel = (latlng) => [latlng.lng * scale, -latlng.lat * scale];
const toLatLng = (col, row) => L.latLng(-row / scale, col / scale);
const screenPerPixel = () => 2 ** (map.getZoom() - scene.maxzoom);

function tileLayer(name, extra = "") {
  return L.tileLayer(`/tiles/${name}/{z}/{x}/{y}.png${extra}`, {
    tileSize: 256,
    minNativeZoom: 0,
    maxNativeZoom: scene.maxzoom,
    minZoom: -4,
    maxZoom: scene.maxzoom + 5,
    noWrap: true,
    bounds: imageBounds(),
    className: "pixelated",
  });
}

const imageBounds = () => L.latLngBounds(toLatLng(0, scene.height), toLatLng(scene.width, 0));
const mapUrl = (layer) => `/tiles/${layer}/${scene.version.id}/{z}/{x}/{y}.png`;

function showScene(data) {
  scene = data;
  $("scene").textContent = `${data.image}: ${data.width} × ${data.height} px · you are ${data.author}`;
  $("edits").textContent = `${data.edits} stroke(s) in force · saved in ${data.session}`;
  $("model").textContent =
    `version ${data.current + 1} of ${data.versions}: ${data.version.model}`;
  $("train-command").textContent = data.train_command;
  $("undo-retrain").disabled = data.current === 0;
  document.body.dataset.version = data.version.id;
  document.body.dataset.edits = data.edits;
  if (layers.classes) {
    layers.classes.setUrl(mapUrl("classes"));
    layers.confidence.setUrl(mapUrl("confidence"));
  }
}

function refreshCorrections(edits) {
  correctionsDrawn += 1;
  layers.corrections.setUrl(`/tiles/corrections/now/{z}/{x}/{y}.png?n=${correctionsDrawn}`);
  scene.edits = edits;
  document.body.dataset.edits = edits;
  $("edits").textContent = `${edits} stroke(s) in force · saved in ${scene.session}`;
}

function buildLegend() {
  const list = $("classes");
  list.replaceChildren();
  for (const info of scene.classes) {
    const item = document.createElement("li");
    item.dataset.index = info.index;
    item.className = info.trainable ? "" : "disabled";
    // names and colours come from the model's file: text and a style value, never markup
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.backgroundColor = info.color;
    const name = document.createElement("span");
    name.textContent = info.name;
    item.append(swatch, name);
    if (info.key) {
      const key = document.createElement("kbd");
      key.textContent = info.key;
      item.append(" ", key);
    }
    if (info.trainable) item.addEventListener("click", () => selectClass(info.index));
    list.appendChild(item);
  }
  const first = scene.classes.find((c) => c.trainable);
  if (first) selectClass(first.index);
}

function selectClass(index) {
  selected = index;
  for (const item of $("classes").children) {
    item.classList.toggle("selected", Number(item.dataset.index) === index);
  }
}

function setTool(name) {
  tool = name;
  clearSketch();
  for (const button of $("tools").children) {
    button.classList.toggle("active", button.dataset.tool === name);
  }
  if (name === "pan") map.dragging.enable();
  else map.dragging.disable();
  map.getContainer().classList.toggle("painting", name !== "pan");
}

function setRadius(value) {
  radius = Math.max(1, Math.min(40, value));
  $("radius").value = radius;
  $("radius-value").textContent = radius;
  if (sketch && tool === "brush") sketch.setStyle({ weight: 2 * radius * screenPerPixel() });
}

function clearSketch() {
  if (sketch) map.removeLayer(sketch);
  sketch = null;
  points = [];
  painting = false;
}

function colourOf(index) {
  const info = scene.classes[index];
  return info ? info.color : "#ffffff";
}

async function sendStroke(kind) {
  const body = { kind, points: points.map(toPixel), radius, tab, class_index: selected };
  const drawn = sketch;
  sketch = null;
  points = [];
  try {
    const answer = await api("/api/edits", body);
    refreshCorrections(answer.edits);
    say(`${kind}: ${answer.pixels} px saved`);
    refreshSuggestions();  // a corrected area is answered: suggest elsewhere
  } catch (err) {
    say(err.message, true);
  } finally {
    if (drawn) setTimeout(() => map.removeLayer(drawn), 400);
  }
}

function startBrush(event) {
  if (event.originalEvent.button !== 0) return;
  painting = true;
  points = [event.latlng];
  sketch = L.polyline(points, {
    color: colourOf(selected),
    weight: 2 * radius * screenPerPixel(),
    opacity: 0.7,
    lineCap: "round",
    lineJoin: "round",
    interactive: false,
  }).addTo(map);
}

function addPolygonPoint(event) {
  points.push(event.latlng);
  const colour = tool === "accept" ? "#ffffff" : colourOf(selected);
  if (!sketch) {
    sketch = L.polygon(points, { color: colour, weight: 2, dashArray: "4 3", interactive: false });
    sketch.addTo(map);
  } else sketch.setLatLngs(points);
}

function finishPolygon() {
  if (points.length >= 3) sendStroke(tool === "accept" ? "accept" : "polygon");
  else clearSketch();
}

async function undoStroke() {
  try {
    const answer = await api("/api/undo", { tab });
    refreshCorrections(answer.edits);
    say(answer.undone ? "last stroke undone" : "nothing of this tab's to undo");
  } catch (err) {
    say(err.message, true);
  }
}

async function retrain() {
  $("retrain").disabled = true;
  say("retraining on the corrections…");
  const started = performance.now();
  try {
    const answer = await api("/api/retrain", {});
    showScene(answer);
    refreshSuggestions();  // the new map hesitates elsewhere
    const r = answer.report;
    $("report").textContent =
      `${r.corrected_pixels} corrected px, fit ${r.seconds} s\n` +
      `corrected px right: ${(100 * r.corrected_accuracy_before).toFixed(0)}% → ` +
      `${(100 * r.corrected_accuracy_after).toFixed(0)}%\n` +
      `${r.changed_pixels} px of the map changed` + scoresText(r.scores);
    say(`retrained in ${((performance.now() - started) / 1000).toFixed(1)} s: ` +
        `run "${answer.run.name}" ${answer.version.run_id}` +
        (answer.run.url ? "" : ` (${answer.run.hint})`));
    if (answer.run.url) {
      const link = document.createElement("a");
      link.href = answer.run.url;
      link.target = "_blank";
      link.rel = "noopener noreferrer";
      link.textContent = " open the run in MLflow";
      $("status").appendChild(link);
    }
  } catch (err) {
    say(err.message, true);
  } finally {
    $("retrain").disabled = false;
  }
}

function scoresText(scores) {
  if (!scores || !scores.after) return "";
  const pct = (v) => (v === undefined ? "–" : `${(100 * v).toFixed(1)}%`);
  return `\non ${scores.scored_on}:\n` +
    `OA ${pct(scores.before.overall_accuracy)} → ${pct(scores.after.overall_accuracy)}, ` +
    `mIoU ${pct(scores.before.mIoU)} → ${pct(scores.after.mIoU)}`;
}

// -- where to label next: the model's most uncertain areas, spread over scene and classes --
let suggestions = [];
let suggestionAt = -1;
let suggestionLayer = null;

async function refreshSuggestions() {
  try {
    suggestions = (await api("/api/suggestions")).suggestions;
  } catch (err) {
    suggestions = [];
  }
  suggestionAt = -1;
  if (suggestionLayer) suggestionLayer.remove();
  suggestionLayer = L.layerGroup(
    suggestions.map((s, i) =>
      L.circle(toLatLng(s.col + 0.5, s.row + 0.5), {
        radius: (s.radius * 1.8) / scale,
        color: "#ff00ff",
        weight: 2,
        fill: false,
        dashArray: "4 3",
        interactive: false,
      }),
    ),
  ).addTo(map);
  document.body.dataset.suggestions = String(suggestions.length);
  $("suggestion").textContent = suggestions.length
    ? `${suggestions.length} places where the model hesitates (dashed circles); N goes to the next`
    : "no suggestion: the map is sure everywhere not corrected";
}

function nextSuggestion() {
  if (!suggestions.length) return;
  suggestionAt = (suggestionAt + 1) % suggestions.length;
  const s = suggestions[suggestionAt];
  // the page says where it is once the (animated) move has ended, so anyone who waits for it
  // finds the suggestion in the middle of the map
  const at = suggestionAt;
  delete document.body.dataset.suggestionAt;
  map.once("moveend", () => { document.body.dataset.suggestionAt = String(at); });
  map.setView(toLatLng(s.col + 0.5, s.row + 0.5), Math.max(map.getZoom(), scene.maxzoom + 1));
  const name = scene.classes[s.class_index] ? scene.classes[s.class_index].name : "?";
  $("suggestion").textContent =
    `${suggestionAt + 1} of ${suggestions.length}: the map says ${name} here, ` +
    `uncertainty ${(100 * s.score).toFixed(0)}%`;
}

async function exportSession() {
  try {
    const done = await api("/api/export", {});
    say(`exported ${done.features} stroke(s) in force: ${done.layer} (with its QGIS style), ` +
        `${done.raster}, and the session as ${done.archive}`);
  } catch (err) {
    say(err.message, true);
  }
}

async function undoRetrain() {
  try {
    showScene(await api("/api/undo-retrain", {}));
    refreshSuggestions();
    $("report").textContent = "";
    say("back to the earlier model");
  } catch (err) {
    say(err.message, true);
  }
}

let hoverTimer = null;
function hover(event) {
  if (hoverTimer) return;
  hoverTimer = setTimeout(async () => {
    hoverTimer = null;
    const [col, row] = toPixel(event.latlng).map(Math.floor);
    try {
      const p = await api(`/api/pixel?col=${col}&row=${row}`);
      const fixed = p.corrected_code === null ? "" : ` · corrected (code ${p.corrected_code})`;
      $("hover").textContent =
        `(${col}, ${row}) ${p.class_name} ${(100 * p.confidence).toFixed(0)}%${fixed}`;
    } catch {
      $("hover").textContent = "";
    }
  }, 120);
}

function bindMap() {
  map.on("mousedown", (e) => { if (tool === "brush") startBrush(e); });
  map.on("mousemove", (e) => {
    hover(e);
    if (tool === "brush" && painting && sketch) {
      points.push(e.latlng);
      sketch.setLatLngs(points);
    }
  });
  map.on("mouseup", () => { if (tool === "brush" && painting) { painting = false; sendStroke("paint"); } });
  map.on("click", (e) => { if (tool === "polygon" || tool === "accept") addPolygonPoint(e); });
  map.on("dblclick", () => { if (tool === "polygon" || tool === "accept") finishPolygon(); });
  map.on("zoomend", () => setRadius(radius));
}

function bindKeys() {
  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "INPUT") return;
    if ((e.ctrlKey || e.metaKey) && e.key.toLowerCase() === "z") { e.preventDefault(); undoStroke(); return; }
    const info = scene.classes.find((c) => c.key === e.key);
    if (info) { selectClass(info.index); return; }
    const tools = { v: "pan", b: "brush", p: "polygon", a: "accept" };
    const key = e.key.toLowerCase();
    if (tools[key]) setTool(tools[key]);
    else if (key === "u") undoStroke();
    else if (key === "r") retrain();
    else if (key === "n") nextSuggestion();
    else if (e.key === "[") setRadius(radius - 1);
    else if (e.key === "]") setRadius(radius + 1);
    else if (e.key === "Enter") finishPolygon();
    else if (e.key === "Escape") clearSketch();
  });
}

async function start() {
  showScene(await api("/api/scene"));
  scale = 2 ** scene.maxzoom;
  map = L.map("map", {
    crs: L.CRS.Simple,
    minZoom: -4,
    maxZoom: scene.maxzoom + 5,
    zoomSnap: 0.25,
    doubleClickZoom: false,
    boxZoom: false,
    attributionControl: false,
  });
  fitImage();
  layers.rgb = tileLayer("rgb/now").addTo(map);
  const imagery = { "imagery (true colour)": layers.rgb };
  if (scene.bands.nir) {  // a scene without a near-infrared band has no false colour
    layers.nir = tileLayer("nir/now");
    imagery["imagery (NIR false colour)"] = layers.nir;
  }
  layers.classes = tileLayer(`classes/${scene.version.id}`).addTo(map);
  layers.confidence = tileLayer(`confidence/${scene.version.id}`);
  layers.corrections = tileLayer("corrections/now", "?n=0").addTo(map);
  layers.classes.setOpacity(0.6);
  layers.confidence.setOpacity(0.65);  // the imagery shows through where the model is sure
  const overlays = {
    "model's map": layers.classes,
    confidence: layers.confidence,
    corrections: layers.corrections,
  };
  if (scene.has_labels) {  // the scene's own labels (--labels), to compare with the map
    layers.labels = tileLayer("labels/now");
    overlays.labels = layers.labels;
  }
  L.control.layers(imagery, overlays, { collapsed: false }).addTo(map);
  map.on("overlayadd", (e) => { if (e.layer === layers.confidence) $("confidence-scale").hidden = false; });
  map.on("overlayremove", (e) => { if (e.layer === layers.confidence) $("confidence-scale").hidden = true; });
  buildLegend();
  bindMap();
  bindKeys();
  for (const button of $("tools").children) {
    button.addEventListener("click", () => setTool(button.dataset.tool));
  }
  $("radius").addEventListener("input", (e) => setRadius(Number(e.target.value)));
  $("opacity").addEventListener("input", (e) => layers.classes.setOpacity(e.target.value / 100));
  $("undo").addEventListener("click", undoStroke);
  $("retrain").addEventListener("click", retrain);
  $("undo-retrain").addEventListener("click", undoRetrain);
  $("next-suggestion").addEventListener("click", nextSuggestion);
  $("export").addEventListener("click", exportSession);
  setTool("pan");
  setRadius(radius);
  await refreshSuggestions();
  say("ready");
  document.body.dataset.ready = "1";
}

// the whole image, clear of the zoom buttons (top left) and the layer list (top right)
function fitImage() {
  map.fitBounds(imageBounds(), { paddingTopLeft: [56, 12], paddingBottomRight: [200, 12] });
}

// For people and for tests: where a pixel of the image is on the screen right now.
window.studio = {
  screenPoint(col, row) {
    const p = map.latLngToContainerPoint(toLatLng(col, row));
    const box = map.getContainer().getBoundingClientRect();
    return { x: box.left + p.x, y: box.top + p.y };
  },
  fit: fitImage,
};

start().catch((err) => say(`cannot open the scene: ${err.message}`, true));
