// grayproxy's dashboard: reads /api/v1 and /metrics every 2 s, keeps 10 minutes of history in
// the page, draws it, and sends the changes a person asks for. Data goes into the page as text only
// (textContent, never innerHTML): a version named "<img onerror=...>" stays a name.
"use strict";

const POLL_MS = 2000;
const HISTORY_MS = 10 * 60 * 1000;
const MIN_SPAN_MS = 60 * 1000;
const TOKEN_KEY = "grayproxy.token";
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2"];
const HELD_HINT = "The weights are held: use the release's controls, or tick force to abort it.";
const SHOWN_CHECKS = 10; // of the 20 the API keeps, newest first
const ACTIVE = new Set(["progressing", "waiting", "paused"]);

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  readOnly: false,
  cards: new Map(), // service name -> its card's elements
  history: new Map(), // service name -> [{t, versions: {name: stats}}]
  timer: null,
  lastTotals: null, // {t, totals} of the last poll, for the request rate
  connected: false, // the token (or none) was accepted: polling
  polling: false,
  pollAgain: false,
};

class ApiError extends Error {
  constructor(status, body) {
    super(body.error || `HTTP ${status}`);
    this.status = status;
    this.details = Array.isArray(body.details) ? body.details : [];
  }
}

async function api(method, path, body) {
  const headers = {};
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin",
    cache: "no-store",
  });
  let answer = {};
  try {
    answer = await response.json();
  } catch {
    answer = { error: `HTTP ${response.status}: not JSON` };
  }
  if (!response.ok) throw new ApiError(response.status, answer);
  return answer;
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function byId(id) {
  return document.getElementById(id);
}

function showError(box, error, hint) {
  box.replaceChildren();
  const prefix = error.status ? `HTTP ${error.status}: ` : "";
  box.append(el("strong", prefix + error.message));
  if (hint) box.append(el("p", hint));
  if (error.details && error.details.length) {
    const list = el("ul");
    for (const detail of error.details) list.append(el("li", detail));
    box.append(list);
  }
  box.hidden = false;
}

// --- the token --------------------------------------------------------------------------

async function connect() {
  try {
    const me = await api("GET", "/api/v1/whoami");
    state.readOnly = me.role !== "admin";
    byId("who").textContent = state.token ? `${me.name} (${me.role})` : "no token needed";
    byId("sign-out").hidden = !state.token;
    byId("login").hidden = true;
    state.connected = true;
    poll();
  } catch (error) {
    if (error.status === 401) askToken(state.token ? error : null);
    else offline(error);
  }
}

function askToken(refused) {
  clearTimeout(state.timer);
  state.connected = false;
  state.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  byId("services").replaceChildren();
  state.cards.clear();
  byId("sign-out").hidden = true;
  byId("who").textContent = "";
  byId("status").textContent = "token needed";
  const message = byId("login-message");
  message.hidden = !refused;
  if (refused) {
    message.textContent =
      `That token was refused (HTTP ${refused.status}: ${refused.message}). ` +
      "Nothing was shown or changed; enter a valid token.";
  }
  byId("login").hidden = false;
  byId("token").value = "";
  byId("token").focus();
}

function submitToken(event) {
  event.preventDefault();
  state.token = byId("token").value.trim();
  sessionStorage.setItem(TOKEN_KEY, state.token);
  connect();
}

function offline(error) {
  byId("status").textContent = "cannot reach the control API";
  showError(byId("banner"), error);
  clearTimeout(state.timer);
  state.timer = setTimeout(connect, POLL_MS);
}

// --- polling ----------------------------------------------------------------------------

// One poll at a time: a poll asked for while one runs (after a change) runs right after it.
async function poll() {
  clearTimeout(state.timer);
  if (state.polling) {
    state.pollAgain = true;
    return;
  }
  state.polling = true;
  try {
    await refresh();
  } finally {
    state.polling = false;
  }
  if (!state.connected) return;
  if (state.pollAgain) {
    state.pollAgain = false;
    return poll();
  }
  state.timer = setTimeout(poll, POLL_MS);
}

async function refresh() {
  try {
    const [listing, { releases }, totals] = await Promise.all([
      api("GET", "/api/v1/services"),
      api("GET", "/api/v1/releases"),
      requestTotals(),
    ]);
    if (!state.connected) return;
    byId("banner").hidden = true;
    const now = Date.now();
    const rates = ratesSince(state.lastTotals, { t: now, totals });
    state.lastTotals = { t: now, totals };
    for (const service of listing.services) {
      record(service, now, rates);
      render(service, releases[service.name] || null);
    }
    dropGone(listing.services);
    byId("status").textContent =
      `generation ${listing.generation} · updated ${new Date(now).toLocaleTimeString()}`;
  } catch (error) {
    if (error.status === 401 && state.connected) return askToken(error);
    byId("status").textContent = "update failed";
    showError(byId("banner"), error);
  }
}

// The request rate is live: the growth of grayproxy_requests_total (/metrics, which needs no
// token) between two polls. The other numbers are the API's stats, over the last minute.
async function requestTotals() {
  const response = await fetch("/metrics", { cache: "no-store" });
  if (!response.ok) throw new ApiError(response.status, { error: "GET /metrics failed" });
  const totals = new Map(); // "service\nversion" -> requests finished since the start
  for (const line of (await response.text()).split("\n")) {
    if (!line.startsWith("grayproxy_requests_total{")) continue;
    const labels = {};
    for (const [, name, value] of line.matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) {
      labels[name] = value.replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    }
    const key = `${labels.service}\n${labels.version}`;
    totals.set(key, (totals.get(key) || 0) + Number(line.slice(line.lastIndexOf(" ") + 1)));
  }
  return totals;
}

function ratesSince(before, now) {
  const rates = new Map();
  if (!before) return rates;
  const seconds = (now.t - before.t) / 1000;
  for (const [key, total] of now.totals) {
    const previous = before.totals.get(key);
    // A restart resets the counters: no rate for that interval.
    if (previous !== undefined && total >= previous) rates.set(key, (total - previous) / seconds);
  }
  return rates;
}

function record(service, now, rates) {
  const points = state.history.get(service.name) || [];
  const versions = {};
  for (const [name, version] of Object.entries(service.versions)) {
    const rate = rates.get(`${service.name}\n${name}`);
    versions[name] = { ...version.stats, rate: rate === undefined ? null : rate };
  }
  points.push({ t: now, versions });
  while (points.length && points[0].t < now - HISTORY_MS) points.shift();
  state.history.set(service.name, points);
}

function dropGone(services) {
  const names = new Set(services.map((s) => s.name));
  for (const [name, card] of state.cards) {
    if (!names.has(name)) {
      card.root.remove();
      state.cards.delete(name);
      state.history.delete(name);
    }
  }
}

// --- one service's card ------------------------------------------------------------------

function cardOf(service) {
  let card = state.cards.get(service.name);
  if (card) return card;
  const root = byId("service-template").content.firstElementChild.cloneNode(true);
  const find = (selector) => root.querySelector(selector);
  card = {
    root,
    name: service.name,
    message: find(".message"),
    versionRows: find(".versions tbody"),
    legend: find(".legend"),
    charts: root.querySelectorAll("canvas.chart"),
    weightsForm: find(".weights-form"),
    weightInputs: find(".weights-inputs"),
    promoteVersion: find(".promote-version"),
    force: find(".force-box"),
    release: find(".release"),
    versionNames: "",
    editing: false,
  };
  root.dataset.service = service.name;
  find(".service-name").textContent = service.name;
  find(".readonly-note").hidden = !state.readOnly;
  card.weightsForm.addEventListener("submit", (event) => {
    event.preventDefault();
    setWeights(card);
  });
  card.weightsForm.addEventListener("input", () => (card.editing = true));
  find(".reset-weights").addEventListener("click", () => (card.editing = false));
  find(".promote-button").addEventListener("click", () =>
    change(card, "POST", "promote", { version: card.promoteVersion.value }, true),
  );
  find(".rollback-button").addEventListener("click", () =>
    change(card, "POST", "rollback", undefined, true),
  );
  for (const button of root.querySelectorAll(".release-command")) {
    button.addEventListener("click", () =>
      change(card, "POST", `release/${button.dataset.command}`, undefined, false),
    );
  }
  for (const control of root.querySelectorAll("input, select, button")) {
    if (state.readOnly) control.disabled = true;
  }
  state.cards.set(service.name, card);
  byId("services").append(root);
  return card;
}

function render(service, release) {
  const card = cardOf(service);
  const match = service.match;
  card.root.querySelector(".service-match").textContent =
    `${match.host || "any host"} ${match.path_prefix || "/"} · baseline ${service.baseline}`;
  const names = Object.keys(service.versions);
  if (names.join("\n") !== card.versionNames) buildVersionControls(card, names);
  renderVersions(card, service);
  if (!card.editing) {
    for (const name of names) card.inputs[name].value = service.versions[name].weight;
  }
  card.charts.forEach((canvas) => drawChart(canvas, state.history.get(service.name), names));
  renderRelease(card, release);
}

function buildVersionControls(card, names) {
  card.versionNames = names.join("\n");
  card.inputs = {};
  card.weightInputs.replaceChildren();
  card.promoteVersion.replaceChildren();
  card.legend.replaceChildren();
  names.forEach((name, index) => {
    const input = el("input");
    input.type = "number";
    input.min = "0";
    input.max = "100";
    input.step = "any";
    input.name = name;
    input.className = "weight";
    input.disabled = state.readOnly;
    card.inputs[name] = input;
    const label = el("label", `${name} `);
    label.append(input);
    card.weightInputs.append(label);
    card.promoteVersion.append(el("option", name));
    const item = el("span", name, "legend-item");
    const swatch = el("i");
    swatch.style.backgroundColor = colorOf(index);
    item.prepend(swatch);
    card.legend.append(item);
  });
}

function renderVersions(card, service) {
  const points = state.history.get(service.name);
  const latest = points[points.length - 1].versions;
  const rows = Object.entries(service.versions).map(([name, version]) => {
    const row = el("tr");
    row.dataset.version = name;
    const stats = version.stats;
    const rate = latest[name].rate;
    row.append(
      el("td", name),
      el("td", version.weight, "weight-value"),
      el("td", rate === null ? "-" : rate.toFixed(1), "rate-value"),
      el("td", `${stats.errors} (${(stats.error_rate * 100).toFixed(2)} %)`),
      el("td", stats.p50_ms),
      el("td", stats.p99_ms),
      endpointsCell(version.endpoints),
    );
    return row;
  });
  card.versionRows.replaceChildren(...rows);
}

function endpointsCell(endpoints) {
  const cell = el("td");
  for (const endpoint of endpoints) {
    const health = endpoint.healthy ? "up" : "down";
    cell.append(el("span", `${endpoint.address} ${health}`, `endpoint ${health}`));
  }
  return cell;
}

function renderRelease(card, release) {
  const box = card.release;
  box.hidden = !release;
  if (!release) return;
  const active = ACTIVE.has(release.state);
  const find = (selector) => box.querySelector(selector);
  const badge = find(".release-state");
  badge.textContent = release.state;
  badge.dataset.state = release.state;
  find(".release-summary").textContent =
    `${release.canary} against ${release.baseline}: ` +
    `step ${release.step + 1} of ${release.steps}, ` +
    `canary ${release.weight} % · approval ${release.approval || "not needed"} · ` +
    `failed checks ${release.failures} · inconclusive in a row ${release.inconclusive}`;
  find(".release-reason").textContent = release.reason;
  const steps = release.spec.steps.map((step, index) => {
    const item = el("li", `${step.weight} %`);
    if (step.pause) item.append(el("small", ` pause ${step.pause}s`));
    if (step.approval) item.append(el("small", " approval"));
    item.className = index < release.step ? "done" : index === release.step ? "current" : "";
    return item;
  });
  find(".release-steps").replaceChildren(...steps);
  const allowed = {
    approve: active && release.approval === "pending",
    pause: release.state === "progressing" || release.state === "waiting",
    resume: release.state === "paused",
    abort: active,
  };
  for (const button of box.querySelectorAll(".release-command")) {
    button.disabled = state.readOnly || !allowed[button.dataset.command];
  }
  const checks = release.checks.slice(-SHOWN_CHECKS).reverse().map(checkRow);
  find(".checks tbody").replaceChildren(...checks);
}

function checkRow(check) {
  const side = (s) => `${s.requests} / ${s.errors} / ${s.p99_ms} ms`;
  const row = el("tr", undefined, `check ${check.result}`);
  row.append(
    el("td", new Date(check.at).toLocaleTimeString()),
    el("td", check.result),
    el("td", side(check.canary)),
    el("td", side(check.baseline)),
    el("td", check.reason),
  );
  return row;
}

// --- changes ----------------------------------------------------------------------------

function setWeights(card) {
  const weights = {};
  for (const [name, input] of Object.entries(card.inputs)) weights[name] = Number(input.value);
  change(card, "PUT", "weights", weights, true).then((done) => {
    if (done) card.editing = false;
  });
}

async function change(card, method, action, body, held) {
  const force = held && card.force.checked ? "?force=true" : "";
  const path = `/api/v1/services/${encodeURIComponent(card.name)}/${action}${force}`;
  try {
    await api(method, path, body);
    card.message.hidden = true;
    card.force.checked = false;
    await poll();
    return true;
  } catch (error) {
    const hint = held && error.status === 409 ? HELD_HINT : null;
    if (error.status === 401) askToken(error);
    else showError(card.message, error, hint);
    return false;
  }
}

// --- charts -----------------------------------------------------------------------------

const METRICS = {
  rate: [{ value: (s) => s.rate }],
  errors: [{ value: (s) => s.error_rate * 100 }],
  latency: [{ value: (s) => s.p99_ms }, { value: (s) => s.p50_ms, dash: [4, 3] }],
};

function colorOf(index) {
  return COLORS[index % COLORS.length];
}

function drawChart(canvas, points, names) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || canvas.width;
  const height = canvas.clientHeight || canvas.height;
  if (canvas.width !== Math.round(width * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, width, height);
  const lines = METRICS[canvas.dataset.metric];
  const now = points.length ? points[points.length - 1].t : Date.now();
  // The span shown grows with the history, from one minute up to HISTORY_MS.
  const span = Math.max(MIN_SPAN_MS, now - (points.length ? points[0].t : now));
  const values = points.flatMap((p) =>
    names.flatMap((n) => (p.versions[n] ? lines.map((l) => l.value(p.versions[n])) : [])),
  ).filter((v) => v !== null);
  const top = niceCeiling(Math.max(0, ...values));
  const plot = { left: 44, right: width - 8, top: 8, bottom: height - 18 };
  const x = (t) => plot.right - ((now - t) / span) * (plot.right - plot.left);
  const y = (v) => plot.bottom - (v / top) * (plot.bottom - plot.top);
  drawAxes(g, plot, top, y, span);
  names.forEach((name, index) => {
    for (const line of lines) {
      g.strokeStyle = colorOf(index);
      g.lineWidth = 1.5;
      g.setLineDash(line.dash || []);
      g.beginPath();
      let started = false;
      for (const point of points) {
        const stats = point.versions[name];
        if (!stats || line.value(stats) === null) continue;
        const [px, py] = [x(point.t), y(line.value(stats))];
        if (started) g.lineTo(px, py);
        else g.moveTo(px, py);
        started = true;
      }
      g.stroke();
    }
  });
  g.setLineDash([]);
}

function drawAxes(g, plot, top, y, span) {
  g.font = "10px sans-serif";
  g.fillStyle = "#6b7280";
  g.strokeStyle = "#e5e7eb";
  g.lineWidth = 1;
  g.textAlign = "right";
  g.textBaseline = "middle";
  for (let i = 0; i <= 4; i += 1) {
    const value = (top * i) / 4;
    const py = Math.round(y(value)) + 0.5;
    g.beginPath();
    g.moveTo(plot.left, py);
    g.lineTo(plot.right, py);
    g.stroke();
    g.fillText(formatNumber(value), plot.left - 4, py);
  }
  g.textBaseline = "top";
  g.textAlign = "left";
  const seconds = Math.round(span / 1000);
  const ago = seconds < 120 ? `${seconds} s ago` : `${Math.round(seconds / 60)} min ago`;
  g.fillText(ago, plot.left, plot.bottom + 4);
  g.textAlign = "right";
  g.fillText("now", plot.right, plot.bottom + 4);
}

function niceCeiling(value) {
  if (value <= 0) return 1;
  const magnitude = 10 ** Math.floor(Math.log10(value));
  const step = [1, 2, 4, 6, 8, 10].find((s) => s * magnitude >= value);
  return step * magnitude;
}

function formatNumber(value) {
  return value >= 100 ? value.toFixed(0) : Number(value.toPrecision(3)).toString();
}

document.addEventListener("DOMContentLoaded", () => {
  byId("login").addEventListener("submit", submitToken);
  byId("sign-out").addEventListener("click", () => askToken(null));
  connect();
});
