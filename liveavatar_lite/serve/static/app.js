// The service's page: upload, queue, progress (server-sent events), live clip-by-clip playback, result.
// Plain browser APIs only (fetch, ReadableStream, <video>); nothing loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { token: localStorage.getItem("la-token") || "", job: null, clips: [], playing: -1, stream: null };
window.__events = [];  // every progress event the page saw (the browser test reads it)

function headers() {
  return state.token ? { Authorization: "Bearer " + state.token } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (response.status === 401) {
    $("auth").hidden = false;
    throw new Error("this server needs its token");
  }
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

function seconds(s) {
  if (s === null || s === undefined) return "";
  return s < 90 ? Math.round(s) + " s" : Math.round(s / 60) + " min";
}

// ---- readiness and the queue ----------------------------------------------------------------------

async function refreshReady() {
  try {
    const r = await fetch("/readyz");
    let reason = "loading the model…";
    try { reason = (await r.json()).reason || reason; } catch (e) { /* not JSON */ }
    $("ready").textContent = r.ok ? "model warm" : reason;  // why not ready: loading, cannot load, stalled, disk, draining
    $("ready").className = "badge " + (r.ok ? "ok" : "bad");
  } catch (e) {
    $("ready").textContent = "server unreachable";
    $("ready").className = "badge bad";
  }
}

async function refreshQueue() {
  let jobs;
  try { jobs = (await (await api("/v1/jobs?limit=20")).json()).jobs; } catch (e) { return; }
  const body = $("queue");
  body.replaceChildren();
  for (const job of jobs) {
    const row = document.createElement("tr");
    const state = job.error ? job.state + ": " + job.error : job.state;  // a failure shows its reason
    const cells = [job.id.slice(0, 8), state, job.clips_done + "/" + job.clips_total, seconds(job.eta_s)];
    for (const text of cells) {
      const td = document.createElement("td");
      td.textContent = text;
      row.appendChild(td);
    }
    const td = document.createElement("td");
    if (job.state === "queued" || job.state === "running") {
      const button = document.createElement("button");
      button.textContent = "cancel";
      button.onclick = () => api("/v1/jobs/" + job.id, { method: "DELETE" }).catch((e) => alert(e.message));
      td.appendChild(button);
    } else if (job.state === "done") {
      const button = document.createElement("button");
      button.textContent = "show";
      button.onclick = () => watch(job.id);
      td.appendChild(button);
    }
    row.appendChild(td);
    body.appendChild(row);
  }
}

// ---- one job: progress events, live clips, the result ---------------------------------------------

async function watch(id) {
  if (state.stream) state.stream.cancel();
  state.job = id; state.clips = []; state.playing = -1;
  $("current").hidden = false;
  $("job-id").textContent = id;
  $("job-error").textContent = "";
  $("download").hidden = true;
  $("result").removeAttribute("src");
  $("live").removeAttribute("src");
  const response = await api("/v1/jobs/" + id + "/events");
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  state.stream = reader;
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {  // one server-sent event per blank-line-terminated block
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5)).join("\n");
      if (data && state.job === id) await show(JSON.parse(data));
    }
  }
}

async function show(job) {
  window.__events.push({ state: job.state, clips_done: job.clips_done, clips_total: job.clips_total });
  $("state").textContent = job.state + (job.cancel_requested && job.state === "running" ? " (cancelling)" : "");
  $("clips").textContent = job.clips_done + "/" + job.clips_total;
  $("progress").value = job.progress !== undefined ? job.progress : (job.clips_total ? job.clips_done / job.clips_total : 0);
  $("eta").textContent = job.eta_s !== null && job.state !== "done" ? "about " + seconds(job.eta_s) + " left" : "";
  $("ttff").textContent = job.first_frame_s !== null ? "· first frame after " + job.first_frame_s.toFixed(1) + " s" : "";
  $("job-error").textContent = job.error ? (job.error_kind ? job.error_kind + ": " : "") + job.error : "";
  if (job.state === "running") await loadClips(job);
  if (job.state === "done") await showResult(job);
  refreshQueue();
}

async function loadClips(job) {
  while (state.clips.length < job.clips_done) {
    const n = state.clips.length;
    const blob = await (await api("/v1/jobs/" + job.id + "/clips/" + n)).blob();
    state.clips.push(URL.createObjectURL(blob));
  }
  const live = $("live");
  if (state.playing < 0 && state.clips.length) playClip(0);
  else if (live.ended && state.playing + 1 < state.clips.length) playClip(state.playing + 1);
}

function playClip(n) {
  state.playing = n;
  const live = $("live");
  live.src = state.clips[n];
  live.play().catch(() => {});
}

$("live").addEventListener("ended", () => {
  if (state.playing + 1 < state.clips.length) playClip(state.playing + 1);
});

async function showResult(job) {
  const blob = await (await api(job.video)).blob();
  const url = URL.createObjectURL(blob);
  const result = $("result");
  result.src = url;
  const link = $("download");
  link.href = url;
  link.download = job.id + ".mp4";
  link.hidden = false;
}

// ---- the form -------------------------------------------------------------------------------------

$("job-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("form-error").textContent = "";
  const form = new FormData();
  for (const name of ["image", "audio"]) form.append(name, $(name).files[0]);
  for (const name of ["prompt", "size", "seed", "num_clip"]) {
    if ($(name).value.trim() !== "") form.append(name, $(name).value.trim());
  }
  $("submit").disabled = true;
  try {
    const job = await (await api("/v1/jobs", { method: "POST", body: form })).json();
    refreshQueue();
    watch(job.id).catch((e) => { $("job-error").textContent = e.message; });
  } catch (e) {
    $("form-error").textContent = e.message;
  } finally {
    $("submit").disabled = false;
  }
});

$("save-token").addEventListener("click", () => {
  state.token = $("token").value.trim();
  localStorage.setItem("la-token", state.token);
  $("auth").hidden = true;
  refreshQueue();
});

refreshReady();
refreshQueue();
setInterval(refreshReady, 5000);
setInterval(refreshQueue, 3000);
