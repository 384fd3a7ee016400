// Talk mode: the microphone streamed to a session's WebSocket as 16 kHz float32 PCM, the avatar played
// back live through Media Source Extensions (fragmented mp4, one fragment per block). docs/serve.md.
"use strict";

// What the page received and how the session went (the browser test reads it).
window.__talk = { state: "idle", received: [], bytes: 0, blocks: [], errors: [], mime: null, closeCode: null };
const talk = { ws: null, audio: null, mic: null, source: null, buffer: null, queue: [] };

function talkState(text) {
  window.__talk.state = text;
  $("talk-state").textContent = text;
}

function talkButtons(running) {
  $("talk-start").disabled = running;
  for (const id of ["talk-end", "talk-interrupt", "talk-stop"]) $(id).disabled = !running;
}

function talkFail(message) {
  window.__talk.errors.push(message);
  $("talk-error").textContent = message;
}

// ---- playback: MSE, appended in order --------------------------------------------------------------

function openMedia(mime) {
  const video = $("talk-video");
  const media = new MediaSource();
  video.src = URL.createObjectURL(media);
  media.addEventListener("sourceopen", () => {
    talk.buffer = media.addSourceBuffer(mime);
    talk.buffer.addEventListener("updateend", appendNext);
    talk.buffer.addEventListener("error", () => talkFail("the browser could not append the stream"));
    appendNext();
  }, { once: true });
  video.addEventListener("error", () => talkFail("video error: " + (video.error && video.error.message)));
}

function appendNext() {
  const buffer = talk.buffer;
  if (!buffer || buffer.updating) return;
  const video = $("talk-video");
  if (buffer.buffered.length && video.currentTime - buffer.buffered.start(0) > 30) {
    buffer.remove(0, video.currentTime - 10);  // keep the played past short: memory stays bounded
    return;
  }
  if (!talk.queue.length) return;
  buffer.appendBuffer(talk.queue.shift());
  if (video.paused) video.play().catch(() => {});
}

// ---- the session -----------------------------------------------------------------------------------

async function startTalk() {
  $("talk-error").textContent = "";
  Object.assign(window.__talk, { received: [], bytes: 0, blocks: [], errors: [], mime: null, closeCode: null });
  const form = new FormData();
  form.append("image", $("talk-image").files[0]);
  form.append("prompt", $("talk-prompt").value.trim());
  form.append("idle", $("talk-idle").value);
  if ($("talk-size").value.trim()) form.append("size", $("talk-size").value.trim());
  talkButtons(true);
  talkState("starting");
  const session = await (await api("/v1/sessions", { method: "POST", body: form })).json();
  talk.mic = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true } });
  talk.audio = new AudioContext({ sampleRate: 16000 });
  await talk.audio.audioWorklet.addModule("/static/talk-worklet.js");
  talk.source = talk.audio.createMediaStreamSource(talk.mic);
  const capture = new AudioWorkletNode(talk.audio, "pcm-capture");
  const mute = talk.audio.createGain();
  mute.gain.value = 0;
  talk.source.connect(capture).connect(mute).connect(talk.audio.destination);  // pulled, not heard

  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const url = scheme + "://" + location.host + session.stream + "?rate=" + talk.audio.sampleRate +
    "&format=f32&token=" + encodeURIComponent(state.token);
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  talk.ws = ws;
  let ready = false;
  capture.port.onmessage = (event) => { if (ready && ws.readyState === WebSocket.OPEN) ws.send(event.data); };
  ws.onmessage = (event) => {
    if (typeof event.data !== "string") {
      const bytes = new Uint8Array(event.data);
      window.__talk.received.push(bytes);
      window.__talk.bytes += bytes.length;
      talk.queue.push(bytes);
      appendNext();
      return;
    }
    const message = JSON.parse(event.data);
    if (message.type === "waiting") talkState("waiting for the worker");
    else if (message.type === "ready") { ready = true; talkState("talking"); }
    else if (message.type === "media") { window.__talk.mime = message.mime; openMedia(message.mime); }
    else if (message.type === "block") {
      window.__talk.blocks.push(message);
      $("talk-blocks").textContent = window.__talk.blocks.length;
      if (message.latency_s !== null) $("talk-latency").textContent = message.latency_s.toFixed(2) + " s";
    } else if (message.type === "error") talkFail(message.error);
  };
  ws.onclose = (event) => {
    window.__talk.closeCode = event.code;
    stopMic();
    talkButtons(false);
    talkState(window.__talk.errors.length ? "error" : "ended");
  };
}

function stopMic() {
  if (talk.mic) talk.mic.getTracks().forEach((t) => t.stop());
  if (talk.audio) talk.audio.close();
  talk.mic = talk.audio = null;
}

function control(type) {
  if (talk.ws && talk.ws.readyState === WebSocket.OPEN) talk.ws.send(JSON.stringify({ type }));
}

$("talk-form").addEventListener("submit", (event) => {
  event.preventDefault();
  startTalk().catch((e) => { talkFail(e.message); stopMic(); talkButtons(false); talkState("error"); });
});
$("talk-end").addEventListener("click", () => control("end"));
$("talk-interrupt").addEventListener("click", () => control("interrupt"));
$("talk-stop").addEventListener("click", () => { stopMic(); control("close"); talkState("closing"); });
