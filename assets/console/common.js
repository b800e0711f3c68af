// whipgate web console: what every page shares.
"use strict";

const whipgate = {
  /** The admin token for /api/v1 (server.api_token), kept in this browser. */
  apiToken() {
    return localStorage.getItem("whipgate.apiToken") || "";
  },
  setApiToken(token) {
    if (token) localStorage.setItem("whipgate.apiToken", token);
    else localStorage.removeItem("whipgate.apiToken");
  },
  /** fetch() on the API: JSON in and out, problems thrown as Errors. */
  async api(method, path, body) {
    const headers = {};
    const token = whipgate.apiToken();
    if (token) headers["Authorization"] = "Bearer " + token;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const resp = await fetch("/api/v1" + path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (!resp.ok) {
      let detail = resp.statusText;
      try {
        detail = (await resp.json()).detail || detail;
      } catch (_) {}
      const err = new Error(resp.status + ": " + detail);
      err.status = resp.status;
      throw err;
    }
    return resp.status === 204 ? null : resp.json();
  },
  /** The last path segment: /watch/NAME, /publish/NAME. */
  streamFromPath() {
    return decodeURIComponent(location.pathname.split("/").filter(Boolean).pop() || "");
  },
  bitrate(bits) {
    if (bits == null) return "";
    if (bits >= 1e6) return (bits / 1e6).toFixed(2) + " Mbit/s";
    return Math.round(bits / 1e3) + " kbit/s";
  },
  duration(secs) {
    if (secs == null) return "";
    const h = Math.floor(secs / 3600), m = Math.floor(secs / 60) % 60, s = secs % 60;
    return (h ? h + ":" + String(m).padStart(2, "0") : m) + ":" + String(s).padStart(2, "0");
  },
  /** Text node helper: el("td", {class: "x"}, "text", child). */
  el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== undefined && v !== null) e.setAttribute(k, v);
    }
    for (const c of children) {
      if (c !== undefined && c !== null) e.append(c);
    }
    return e;
  },
};
