// embedstore playground: the page holds the variant (one per tab) and sends it with each request.
"use strict";

const S = { exp: null, variant: null, result: null, inFlight: false, again: false, cell: null, table: null };
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  return node;
}
const fmt = (x, d = 4) => (x === null || x === undefined) ? "–" : Number(x).toFixed(d);

async function api(path, body, opts = {}) {
  const init = body === undefined ? {} : { method: "POST", headers: { "Content-Type": opts.type || "application/json" },
    body: opts.type ? body : JSON.stringify(body) };
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
  return data;
}

function status(text, kind) {
  const s = $("status");
  s.textContent = text || "";
  s.className = "status" + (kind ? " " + kind : "");
}

// ---- the experiment panel
function renderPanel() {
  const v = S.variant, exp = S.exp;
  $("where").textContent = `${exp.dataset}: ${exp.rows.toLocaleString()} images · ${exp.experiment_file}`;
  $("classes").replaceChildren(...exp.classes.map((c) => el("span", {}, c)));
  $("aggregate").value = v.aggregate;
  $("ensemble").value = v.ensemble;
  $("scale").value = v.scale;
  $("drop-on").checked = v.drop_below !== null;
  if (v.drop_below !== null) $("drop").value = v.drop_below;
  $("drop-on").disabled = $("drop").disabled = v.aggregate !== "prob-mean";
  $("weights").replaceChildren(...exp.members.map((m, i) => {
    const out = el("span", {}, fmt(v.weights[i], 2));
    const slider = el("input", { type: "range", min: 0, max: 1, step: 0.01, value: v.weights[i], "aria-label": `weight of ${m.label}`,
      "data-member": i, oninput: (e) => { v.weights[i] = Number(e.target.value); out.textContent = fmt(v.weights[i], 2); changed(); } });
    return el("div", { class: "weight" }, el("span", { class: "name", title: m.label }, m.kind === "zero-shot" ? m.short : `${m.short} (${m.kind})`), slider, out);
  }));
  renderPrompts();
}

function renderPrompts() {
  const v = S.variant;
  const on = v.prompts.filter((p) => p.on).length;
  $("prompt-count").textContent = `${on} of ${v.prompts.length} on`;
  $("prompts").replaceChildren(...v.prompts.map((p, i) => {
    const cls = el("select", { "aria-label": "prompt kind", onchange: (e) => { p.class = e.target.value || null; changed(); } },
      el("option", { value: "" }, "template"), ...S.exp.classes.map((c) => el("option", { value: c, selected: p.class === c }, c)));
    return el("div", { class: "prompt" + (p.on ? "" : " off") },
      el("input", { type: "checkbox", checked: p.on, title: "on/off", onchange: (e) => { p.on = e.target.checked; renderPrompts(); changed(); } }),
      el("input", { type: "text", value: p.text, "aria-label": "prompt text",
        onchange: (e) => { p.text = e.target.value; changed(); } }),
      cls,
      el("button", { type: "button", title: "remove", onclick: () => { v.prompts.splice(i, 1); renderPrompts(); changed(); } }, "×"));
  }));
}

function readPanel() {
  const v = S.variant;
  v.aggregate = $("aggregate").value;
  v.ensemble = $("ensemble").value;
  const scale = $("scale").value.trim();
  v.scale = scale === "model" ? "model" : Number(scale);
  v.drop_below = (v.aggregate === "prob-mean" && $("drop-on").checked) ? Number($("drop").value) : null;
  $("drop-on").disabled = $("drop").disabled = v.aggregate !== "prob-mean";
}

// ---- running: one request in flight; changes made meanwhile run once it returns
let timer = null;
function changed() {
  clearTimeout(timer);
  timer = setTimeout(run, 60);
}

async function run() {
  if (S.inFlight) { S.again = true; return; }
  S.inFlight = true; S.again = false;
  const poll = setInterval(showActivity, 300);
  status("scoring…", "busy");
  try {
    const result = await api("api/run", S.variant);
    S.result = result;
    renderResult();
    status(`${result.rows.toLocaleString()} images × ${result.prompts} prompts in ${fmt(result.seconds, 3)} s`
      + (result.new_prompts ? ` (${result.new_prompts} prompts newly encoded)` : ""));
  } catch (err) {
    status(err.message, "error");
  } finally {
    clearInterval(poll);
    S.inFlight = false;
    if (S.again) run();
  }
}

async function showActivity() {
  try {
    const a = await api("api/activity");
    if (a.busy) status(`${a.what}… ${a.seconds} s`, "busy");
  } catch (err) { /* the run's own answer reports errors */ }
}

// ---- results
function renderResult() {
  const r = S.result, m = r.metrics;
  $("notes").replaceChildren(...r.notes.map((n) => el("div", {}, "note: " + n)));
  if (!m) {
    $("metrics").replaceChildren(el("span", {}, "no labels: no metrics"));
    $("confusion").replaceChildren(); $("per-class").replaceChildren();
    return;
  }
  $("metrics").replaceChildren(
    el("span", {}, "accuracy ", el("span", { class: "big", id: "accuracy" }, fmt(m.accuracy))),
    el("span", {}, "macro-F1 ", el("span", { class: "big", id: "macro-f1" }, fmt(m.macro_f1))),
    el("span", {}, "mean recall ", el("b", {}, fmt(m.mean_recall))),
    m.top_k_accuracy !== null ? el("span", {}, `top-${m.top_k} `, el("b", {}, fmt(m.top_k_accuracy))) : null,
    el("span", { class: "muted" }, `${m.n.toLocaleString()} images, ${r.prompts} prompts`));
  const c = r.classes.length;
  const max = Math.max(1, ...m.confusion.flat());
  const head = el("tr", {}, el("th", { class: "label" }, "true \\ pred"), ...r.classes.map((x) => el("th", { title: x }, x.slice(0, 10))));
  const rows = m.confusion.map((row, i) => el("tr", {}, el("th", { class: "label" }, r.classes[i]), ...row.map((n, j) => {
    const shade = n / max;
    const bg = i === j ? `rgba(42,157,143,${0.12 + 0.75 * shade})` : (n ? `rgba(231,111,81,${0.15 + 0.8 * shade})` : "#fff");
    const selected = S.cell && S.cell[0] === i && S.cell[1] === j;
    return el("td", { class: "cell" + (selected ? " selected" : ""), style: `background:${bg}`, "data-true": i, "data-pred": j,
      title: `${r.classes[i]} → ${r.classes[j]}: ${n}`, onclick: () => showCell(i, j) }, n);
  })));
  $("confusion").replaceChildren(c <= 40 ? el("table", {}, head, ...rows) : el("p", { class: "muted" }, `${c} classes: too many for a matrix here`));
  $("per-class").replaceChildren(el("table", {},
    el("tr", {}, ...["class", "precision", "recall", "F1", "support"].map((h) => el("th", { class: h === "class" ? "label" : "" }, h))),
    ...m.per_class.map((p) => el("tr", {}, el("td", { class: "label" }, p.name), el("td", {}, fmt(p.precision, 3)),
      el("td", {}, fmt(p.recall, 3)), el("td", {}, fmt(p.f1, 3)), el("td", {}, p.support)))));
  if (S.cell) showCell(S.cell[0], S.cell[1]);
}

function thumb(img, onclick) {
  const picture = S.exp.thumbnails
    ? el("img", { src: "api/thumb?size=132&key=" + encodeURIComponent(img.key), alt: img.key, loading: "lazy" })
    : el("div", { class: "noimg" });
  const lines = (img.top || []).map((t, i) => el("div", { class: i === 0 && img.label && t.class !== img.label ? "wrong" : "" },
    `${t.class} ${fmt(t.probability, 3)}`));
  const score = img.score !== undefined ? el("div", {}, `similarity ${fmt(img.score, 3)}`) : null;
  return el("div", { class: "thumb", title: img.key, onclick }, picture, el("div", { class: "key" }, img.key),
    img.label ? el("div", {}, "true: " + img.label) : null, score, lines);
}

async function showCell(i, j) {
  S.cell = [i, j];
  document.querySelectorAll("#confusion td.selected").forEach((td) => td.classList.remove("selected"));
  const td = document.querySelector(`#confusion td[data-true="${i}"][data-pred="${j}"]`);
  if (td) td.classList.add("selected");
  try {
    const data = await api("api/cell", { result: S.result.id, true: i, predicted: j, limit: 60 });
    $("cell-title").textContent = `Images: true ${data.true}, predicted ${data.predicted} (${data.count}`
      + (data.count > data.images.length ? `, first ${data.images.length} shown)` : ")");
    $("cell").replaceChildren(...data.images.map((img) => thumb(img, () => showNeighbours(img.key))));
  } catch (err) { $("cell").replaceChildren(el("p", { class: "error" }, err.message)); }
}

async function showNeighbours(key) {
  $("neighbours").replaceChildren(el("p", { class: "muted" }, `finding the neighbours of ${key}…`));
  try {
    const data = await api("api/neighbours", { key, k: 12, result: S.result && S.result.id, variant: S.variant });
    $("neighbours").replaceChildren(
      el("h2", {}, `Nearest to ${key}`),
      el("p", {}, "nearest classes (", el("span", { class: "muted" }, data.member + ", prompt-averaged"), "): ",
        data.classes.map((c) => `${c.class} ${fmt(c.probability, 3)}`).join(" · ")),
      el("div", { class: "thumbs" }, data.images.map((img) => thumb(img, () => showNeighbours(img.key)))));
  } catch (err) { $("neighbours").replaceChildren(el("p", { class: "error" }, err.message)); }
}

// ---- which prompts matter
async function promptTable() {
  $("prompt-table-go").disabled = true;
  $("prompt-table-status").textContent = "starting…";
  try {
    let job = await api("api/prompt-table", S.variant);
    while (job.status === "running") {
      $("prompt-table-status").textContent = job.total ? `${job.done} of ${job.total} evaluations` : "reading logits…";
      await new Promise((ok) => setTimeout(ok, 250));
      job = await api("api/jobs/" + job.id);
    }
    if (job.status === "failed") throw new Error(job.error);
    S.table = { rows: job.result.templates, key: "delta", desc: true, accuracy: job.result.accuracy };
    $("prompt-table-status").textContent = `accuracy with every template ${fmt(job.result.accuracy)} on ${job.result.rows.toLocaleString()} images`;
    renderTable();
  } catch (err) {
    $("prompt-table-status").replaceChildren(el("span", { class: "error" }, err.message));
  } finally { $("prompt-table-go").disabled = false; }
}

function renderTable() {
  const t = S.table;
  const rows = [...t.rows].sort((a, b) => {
    const x = a[t.key], y = b[t.key];
    const cmp = typeof x === "string" ? x.localeCompare(y) : (x ?? -Infinity) - (y ?? -Infinity);
    return t.desc ? -cmp : cmp;
  });
  const harmful = t.rows.filter((r) => r.delta !== null && r.delta > 0);
  $("drop-harmful").disabled = !harmful.length;
  $("drop-harmful").textContent = `turn off the harmful ones (${harmful.length})`;
  const cols = [["template", "template"], ["alone", "accuracy alone"], ["without", "accuracy without it"], ["delta", "change when left out"]];
  $("prompt-table").replaceChildren(el("table", {},
    el("tr", {}, cols.map(([k, label]) => el("th", { class: k === "template" ? "label" : "",
      onclick: () => { t.desc = t.key === k ? !t.desc : true; t.key = k; renderTable(); } }, label + (t.key === k ? (t.desc ? " ▾" : " ▴") : "")))),
    rows.map((r) => el("tr", {}, el("td", { class: "label" }, r.template), el("td", {}, fmt(r.alone)), el("td", {}, fmt(r.without)),
      el("td", { class: r.delta > 0 ? "harm" : r.delta < 0 ? "help" : "" }, r.delta === null ? "–" : (r.delta > 0 ? "+" : "") + fmt(r.delta))))));
}

function dropHarmful() {
  const harmful = new Set(S.table.rows.filter((r) => r.delta !== null && r.delta > 0).map((r) => r.template));
  for (const p of S.variant.prompts) if (p.class === null && harmful.has(p.text)) p.on = false;
  renderPrompts();
  changed();
}

// ---- search
async function searchText(e) {
  e.preventDefault();
  const text = $("search-text").value.trim();
  if (!text) return;
  await searchShow(() => api("api/search", { text, k: 24 }));
}

async function searchImage() {
  const file = $("search-image").files[0];
  if (!file) return;
  await searchShow(() => api("api/search-image?k=24", file, { type: file.type || "application/octet-stream" }));
}

async function searchShow(ask) {
  $("search-results").replaceChildren(el("p", { class: "muted" }, "searching…"));
  try {
    const data = await ask();
    $("search-results").replaceChildren(el("p", { class: "muted", style: "width:100%" }, `${data.query}: ${data.member}, ${data.searched}`),
      ...data.images.map((img) => thumb(img, () => showNeighbours(img.key))));
  } catch (err) { $("search-results").replaceChildren(el("p", { class: "error" }, err.message)); }
}

// ---- keeping variants
function renderVariants(list) {
  $("variants").replaceChildren(...list.map((v) => el("li", { title: "go back to this variant",
    onclick: () => { S.variant = JSON.parse(JSON.stringify(v.variant)); renderPanel(); changed(); } },
    `${v.name} (${v.time}): accuracy ${fmt(v.metrics && v.metrics.accuracy)}, ${v.prompts} prompts` + (v.file ? ` → ${v.file}` : ""))));
}

async function keep() {
  if (!S.result) return;
  try { await api("api/variants", { result: S.result.id, name: "" }); renderVariants(await api("api/variants")); }
  catch (err) { status(err.message, "error"); }
}

async function save() {
  const name = $("save-name").value.trim();
  if (!name) { $("save-result").replaceChildren(el("span", { class: "error" }, "give a name first")); return; }
  $("save-result").textContent = "saving…";
  try {
    const data = await api("api/save", { variant: S.variant, name });
    $("save-result").textContent = `wrote ${data.files.join(", ")}; run ${data.run_id} logged (accuracy ${fmt(data.metrics && data.metrics.accuracy)})`;
    renderVariants(await api("api/variants"));
  } catch (err) { $("save-result").replaceChildren(el("span", { class: "error" }, err.message)); }
}

async function start() {
  try {
    S.exp = await api("api/experiment");
  } catch (err) { status(err.message, "error"); return; }
  S.variant = S.exp.variant;
  renderPanel();
  for (const id of ["aggregate", "ensemble", "scale", "drop-on", "drop"]) $(id).addEventListener("change", () => { readPanel(); changed(); });
  $("add-template").onclick = () => { S.variant.prompts.push({ text: "a photo of a {}.", class: null, on: true }); renderPrompts(); changed(); };
  $("add-class-prompt").onclick = () => { S.variant.prompts.push({ text: `a photo of ${S.exp.classes[0]}.`, class: S.exp.classes[0], on: true }); renderPrompts(); changed(); };
  $("all-on").onclick = () => { S.variant.prompts.forEach((p) => { p.on = true; }); renderPrompts(); changed(); };
  $("prompt-table-go").onclick = promptTable;
  $("drop-harmful").onclick = dropHarmful;
  $("search-form").addEventListener("submit", searchText);
  $("search-image").addEventListener("change", searchImage);
  if (!S.exp.image_search) {
    $("search-image").disabled = true;
    $("search-image").parentElement.title = "this server was started without the store's image encoder";
  }
  $("keep").onclick = keep;
  $("save").onclick = save;
  renderVariants(await api("api/variants"));
  run();
}

start();
