// Publishes the camera and microphone with WHIP (RFC 9725): POST of the
// offer, trickle ICE candidates with PATCH, DELETE to stop. H264 is
// preferred: the gateway copies it as it is.
"use strict";

const stream = whipgate.streamFromPath();
const endpoint = new URL("/whip/" + encodeURIComponent(stream), location.href);
const $ = (id) => document.getElementById(id);
$("name").textContent = stream;
document.title = stream + " · publish · whipgate";
$("watch-link").href = "/watch/" + encodeURIComponent(stream);

let pc = null;
let media = null;
let session = null; // { url, etag }
let pending = []; // candidates found before the session URL is known
let patching = Promise.resolve();

function log(text) {
  const line = new Date().toLocaleTimeString() + " " + text;
  $("log").textContent = (line + "\n" + $("log").textContent).slice(0, 4000);
}

function setState(text) {
  $("state").textContent = text;
  $("state").className = text === "connected" ? "badge live" : "badge";
}

function authHeaders() {
  const token = $("token").value.trim();
  return token ? { Authorization: "Bearer " + token } : {};
}

async function listDevices() {
  const devices = await navigator.mediaDevices.enumerateDevices();
  for (const [kind, select] of [["videoinput", $("camera")], ["audioinput", $("microphone")]]) {
    const current = select.value;
    for (const o of [...select.options]) if (o.value && o.value !== "none") o.remove();
    devices.filter((d) => d.kind === kind).forEach((d, i) => {
      select.append(new Option(d.label || `${kind} ${i + 1}`, d.deviceId));
    });
    select.value = current;
  }
}

async function getMedia() {
  const [width, height] = $("resolution").value.split("x").map(Number);
  const camera = $("camera").value;
  const mic = $("microphone").value;
  const constraints = {
    video: camera === "none" ? false : { width: { ideal: width }, height: { ideal: height }, ...(camera ? { deviceId: { exact: camera } } : {}) },
    audio: mic === "none" ? false : (mic ? { deviceId: { exact: mic } } : true),
  };
  return navigator.mediaDevices.getUserMedia(constraints);
}

/** The chosen codec first (`video/h264` with packetization-mode=1, which the
 *  gateway ingests as is, or `video/vp8`, `video/vp9`, `video/av1`, which it
 *  encodes to H264). */
function preferCodec(transceiver, mime) {
  if (!RTCRtpSender.getCapabilities || !transceiver.setCodecPreferences) return false;
  const codecs = RTCRtpSender.getCapabilities("video").codecs;
  const wanted = (c) => c.mimeType.toLowerCase() === mime
    && (mime !== "video/h264" || /packetization-mode=1/.test(c.sdpFmtpLine || ""));
  const first = codecs.filter(wanted);
  if (!first.length) return false;
  // Constrained baseline (42e0..) first: every decoder takes it.
  first.sort((a, b) => /profile-level-id=42e0/.test(b.sdpFmtpLine) - /profile-level-id=42e0/.test(a.sdpFmtpLine));
  // Only the chosen codec (and retransmission / FEC): the gateway takes
  // H264 whenever an offer has it (then VP8, VP9, AV1), so a VP9 choice
  // must offer neither H264 nor VP8.
  const helpers = codecs.filter((c) => /\/(rtx|red|ulpfec|flexfec-03)$/i.test(c.mimeType));
  transceiver.setCodecPreferences([...first, ...helpers]);
  return true;
}

/** RFC 8840 fragment of `candidates` (with end-of-candidates when `end`). */
function sdpFragment(candidates, end) {
  const local = pc.localDescription.sdp;
  const ufrag = local.match(/a=ice-ufrag:(.*)/)[1].trim();
  const pwd = local.match(/a=ice-pwd:(.*)/)[1].trim();
  let frag = `a=ice-ufrag:${ufrag}\r\na=ice-pwd:${pwd}\r\n`;
  // Bundled: every candidate goes with the first m-line.
  const m = local.match(/^m=(\w+) .*/m);
  const mid = local.match(/a=mid:(.*)/)[1].trim();
  frag += `m=${m[1]} 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:${mid}\r\n`;
  for (const c of candidates) frag += "a=" + c + "\r\n";
  if (end) frag += "a=end-of-candidates\r\n";
  return frag;
}

function trickle(candidates, end) {
  if (!session || (!candidates.length && !end)) return;
  const body = sdpFragment(candidates, end);
  patching = patching.then(async () => {
    try {
      const resp = await fetch(session.url, {
        method: "PATCH",
        headers: { "Content-Type": "application/trickle-ice-sdpfrag", "If-Match": session.etag, ...authHeaders() },
        body,
      });
      if (!resp.ok && resp.status !== 422) log(`PATCH: ${resp.status}`);
    } catch (e) {
      log("PATCH failed: " + e.message);
    }
  });
}

async function start() {
  $("start").disabled = true;
  setState("starting");
  try {
    media = await getMedia();
    $("preview").srcObject = media;
    await listDevices();
    pc = new RTCPeerConnection({ bundlePolicy: "max-bundle" });
    pc.addEventListener("connectionstatechange", () => {
      setState(pc.connectionState);
      log("connection " + pc.connectionState);
      if (pc.connectionState === "failed") stop();
    });
    pc.addEventListener("icecandidate", (ev) => {
      if (ev.candidate && ev.candidate.candidate) {
        if (session) trickle([ev.candidate.candidate], false);
        else pending.push(ev.candidate.candidate);
      } else if (!ev.candidate && session) {
        trickle([], true);
      }
    });
    const video = media.getVideoTracks()[0];
    const audio = media.getAudioTracks()[0];
    // Only the tracks there are: an audio-only or video-only offer.
    if (video) {
      const init = { direction: "sendonly", streams: [media] };
      // Simulcast (RFC 8853): the layers the gateway's `simulcast` preset
      // takes, full size first (the stream's main video).
      if ($("simulcast").value === "hml") {
        init.sendEncodings = [
          { rid: "h" },
          { rid: "m", scaleResolutionDownBy: 2 },
          { rid: "l", scaleResolutionDownBy: 4 },
        ];
      }
      const vt = pc.addTransceiver(video, init);
      const codec = $("codec").value;
      if (!preferCodec(vt, codec)) log(`this browser offers no ${codec}: the gateway may refuse the offer`);
    }
    if (audio) pc.addTransceiver(audio, { direction: "sendonly", streams: [media] });
    if (!video && !audio) throw new Error("nothing to publish: choose a camera or a microphone");
    await pc.setLocalDescription(await pc.createOffer());
    const resp = await fetch(endpoint, {
      method: "POST",
      headers: { "Content-Type": "application/sdp", ...authHeaders() },
      body: pc.localDescription.sdp,
    });
    if (resp.status !== 201) {
      let detail = resp.statusText;
      try { detail = (await resp.json()).detail || detail; } catch (_) {}
      throw new Error(`${resp.status}: ${detail}`);
    }
    session = {
      url: new URL(resp.headers.get("Location"), resp.url).href,
      etag: resp.headers.get("ETag"),
    };
    log("session " + session.url);
    await pc.setRemoteDescription({ type: "answer", sdp: await resp.text() });
    trickle(pending, pc.iceGatheringState === "complete");
    pending = [];
    $("stop").disabled = false;
  } catch (e) {
    log("cannot publish: " + e.message);
    await stop();
    setState("error");
  }
}

async function stop() {
  $("stop").disabled = true;
  const ending = session;
  session = null;
  pending = [];
  if (ending) {
    try {
      await fetch(ending.url, { method: "DELETE", headers: authHeaders() });
    } catch (_) {}
  }
  if (pc) pc.close();
  pc = null;
  if (media) media.getTracks().forEach((t) => t.stop());
  media = null;
  $("preview").srcObject = null;
  $("start").disabled = false;
  setState("stopped");
}

$("start").addEventListener("click", start);
$("stop").addEventListener("click", stop);
window.addEventListener("pagehide", () => {
  if (session) fetch(session.url, { method: "DELETE", headers: authHeaders(), keepalive: true });
});
if (navigator.mediaDevices) listDevices().catch(() => {});
else log("no camera access here: the page must be on HTTPS or localhost");
