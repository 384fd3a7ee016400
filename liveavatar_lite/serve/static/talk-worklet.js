// The microphone's samples, in chunks of about 100 ms, to the page (talk.js), which sends them as PCM.
"use strict";

class PcmCapture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.size = Math.round(sampleRate / 10);  // sampleRate: the AudioContext's (16 kHz)
    this.chunk = new Float32Array(this.size);
    this.filled = 0;
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];  // mono: the first channel
    if (channel) {
      let at = 0;
      while (at < channel.length) {
        const n = Math.min(channel.length - at, this.chunk.length - this.filled);
        for (let i = 0; i < n; i++) {  // the server takes float32 in [-1, 1]; a hot microphone is clipped
          this.chunk[this.filled + i] = Math.max(-1, Math.min(1, channel[at + i]));
        }
        this.filled += n;
        at += n;
        if (this.filled === this.chunk.length) {
          this.port.postMessage(this.chunk.buffer, [this.chunk.buffer]);  // transferred: a fresh chunk follows
          this.chunk = new Float32Array(this.size);
          this.filled = 0;
        }
      }
    }
    return true;
  }
}

registerProcessor("pcm-capture", PcmCapture);
