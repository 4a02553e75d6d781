// The playground (README: Playground). Plain browser JS, no build step and no dependency: everything it
// does goes through the server's public API with fetch, exactly as any other client would. Model output
// is only ever put into the page as text (textContent), never parsed as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "serve-transformers.playground.api-key";
  // The API lives beside this page: "/" for /playground, "/prefix/" for /prefix/playground.
  const API = location.pathname.replace(/\/playground\/?$/, "") + "/";

  const el = {
    key: $("api-key"), refresh: $("refresh-models"), modelsStatus: $("models-status"),
    errorBar: $("error-bar"), error: $("error"), errorClose: $("error-close"),
    chatModel: $("chat-model"), chatModelInfo: $("chat-model-info"), clear: $("clear"),
    messages: $("messages"), stats: $("stats"), form: $("chat-form"), prompt: $("prompt"),
    send: $("send"), stop: $("stop"), system: $("system"), temperature: $("temperature"),
    topP: $("top-p"), maxTokens: $("max-tokens"), seed: $("seed"),
    audioModel: $("audio-model"), audioFile: $("audio-file"), record: $("record"),
    recordNote: $("record-note"), audioSource: $("audio-source"), audioPreview: $("audio-preview"),
    language: $("language"), transcribe: $("transcribe"), transcript: $("transcript"),
    audioStats: $("audio-stats"),
  };

  // ---- errors -------------------------------------------------------------------------------------

  class ApiError extends Error {}

  function showError(message) {
    el.error.textContent = message || "Unknown error (the server sent no message).";
    el.errorBar.hidden = false;
  }

  function clearError() {
    el.error.textContent = "";
    el.errorBar.hidden = true;
  }

  // An OpenAI error object ({message, type, param, code}) as one readable line.
  function formatError(err, status) {
    if (typeof err === "string") return status ? `${err} (HTTP ${status})` : err;
    const message = (err && err.message) || JSON.stringify(err);
    const tags = [status ? `HTTP ${status}` : "", err && err.type, err && err.code,
                  err && err.param ? `param: ${err.param}` : ""].filter(Boolean);
    return tags.length ? `${message} (${tags.join(", ")})` : message;
  }

  // The message of a non-2xx answer: the OpenAI error body when it is one, else the text itself.
  async function readError(resp) {
    let text = "";
    try { text = await resp.text(); } catch (e) { /* the body is gone: status only */ }
    try {
      const body = JSON.parse(text);
      if (body && body.error) return formatError(body.error, resp.status);
      if (body && body.detail) return formatError(String(body.detail), resp.status);
    } catch (e) { /* not JSON */ }
    const status = `HTTP ${resp.status}${resp.statusText ? " " + resp.statusText : ""}`;
    return text.trim() ? `${status}: ${text.trim().slice(0, 500)}` : `${status} (empty answer)`;
  }

  function describe(e) {
    if (e instanceof ApiError) return e.message;
    if (e instanceof TypeError) return `Could not reach the server (${e.message}).`;
    return String((e && e.message) || e);
  }

  // ---- API key ------------------------------------------------------------------------------------

  function authHeaders() {
    const key = el.key.value.trim();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  try { el.key.value = localStorage.getItem(KEY_STORE) || ""; } catch (e) { /* storage disabled */ }
  el.key.addEventListener("input", () => {
    try { localStorage.setItem(KEY_STORE, el.key.value.trim()); } catch (e) { /* storage disabled */ }
  });
  el.key.addEventListener("change", () => loadModels());

  // ---- models -------------------------------------------------------------------------------------

  let models = [];
  const isAudio = (m) => m.task === "transcription" || /whisper/i.test(m.id);
  const isChat = (m) => m.task === "chat" || (!m.task && !isAudio(m));
  // Pinned models report `state` (ready, starting, unavailable, unknown); on-demand ones `status`
  // (loaded, loading, available: loaded on its first request).
  const stateOf = (m) => m.state || m.status || "unknown";

  function fillSelect(select, list, placeholder) {
    const previous = select.value;
    select.replaceChildren();
    if (!list.length) {
      select.append(new Option(placeholder, ""));
      select.disabled = true;
      return;
    }
    select.disabled = false;
    const groups = [["Pinned", list.filter((m) => m.status === "pinned" || !m.status)],
                    ["On demand", list.filter((m) => m.status && m.status !== "pinned")]];
    for (const [label, members] of groups) {
      if (!members.length) continue;
      const group = document.createElement("optgroup");
      group.label = label;
      for (const m of members) {
        const option = new Option(`${m.id} (${m.task || "?"}, ${stateOf(m)})`, m.id);
        option.dataset.state = stateOf(m);
        group.append(option);
      }
      select.append(group);
    }
    const ids = list.map((m) => m.id);
    // Keep the choice across refreshes; else the first ready model.
    const ready = list.find((m) => ["ready", "loaded"].includes(stateOf(m)));
    select.value = ids.includes(previous) ? previous : (ready || list[0]).id;
  }

  function modelInfo(id) {
    const m = models.find((x) => x.id === id);
    if (!m) return "";
    const parts = [];
    if (m.status === "pinned") parts.push(`pinned, ${stateOf(m)}`);
    else if (m.status === "available") parts.push("on demand: loads on its first request");
    else if (m.status) parts.push(`on demand, ${m.status}` +
                                  (m.loaded_replicas ? ` on ${m.loaded_replicas} replica(s)` : ""));
    if (m.max_model_len) parts.push(`context ${m.max_model_len} tokens`);
    return parts.join(" · ");
  }

  async function loadModels() {
    el.refresh.disabled = true;
    el.modelsStatus.textContent = "Loading models…";
    try {
      const resp = await fetch(API + "v1/models", { headers: authHeaders(), cache: "no-store" });
      if (!resp.ok) throw new ApiError(`Listing models failed: ${await readError(resp)}`);
      const body = await resp.json();
      models = Array.isArray(body.data) ? body.data : [];
      clearError();
    } catch (e) {
      models = [];
      showError(describe(e));
    } finally {
      el.refresh.disabled = false;
    }
    fillSelect(el.chatModel, models.filter(isChat), "no chat model");
    fillSelect(el.audioModel, models.filter(isAudio), "no transcription model");
    el.chatModelInfo.textContent = modelInfo(el.chatModel.value);
    const ready = models.filter((m) => stateOf(m) === "ready").length;
    const loaded = models.filter((m) => stateOf(m) === "loaded").length;
    const onDemand = models.filter((m) => m.status && m.status !== "pinned").length;
    el.modelsStatus.textContent = `${models.length} models: ${ready} pinned ready` +
      (onDemand ? `, ${onDemand} on demand (${loaded} loaded)` : "");
    document.body.dataset.models = "loaded";  // for tests and scripts: the pickers are filled
  }

  el.refresh.addEventListener("click", () => loadModels());
  el.chatModel.addEventListener("change", () => { el.chatModelInfo.textContent = modelInfo(el.chatModel.value); });

  // ---- chat ---------------------------------------------------------------------------------------

  let history = [];          // the conversation sent with each request: {role, content}
  let controller = null;     // the AbortController of the answer in flight

  function addMessage(role, text) {
    el.messages.querySelector(".placeholder")?.remove();
    const root = document.createElement("div");
    root.className = `msg ${role}`;
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = role === "user" ? "You" : el.chatModel.value || "assistant";
    const content = document.createElement("div");
    content.className = "content";
    content.textContent = text;
    const meta = document.createElement("div");
    meta.className = "meta";
    root.append(who, content, meta);
    el.messages.append(root);
    scrollDown();
    return { root, content, meta };
  }

  function scrollDown() { el.messages.scrollTop = el.messages.scrollHeight; }

  // The sampling fields as request parameters; throws ApiError naming a field that is not a number.
  function samplingParams() {
    const params = {};
    const number = (input, name, integer) => {
      const raw = input.value.trim();
      if (raw === "") return;
      const value = Number(raw);
      if (!Number.isFinite(value) || (integer && !Number.isInteger(value))) {
        throw new ApiError(`${name} must be ${integer ? "an integer" : "a number"} (got "${raw}").`);
      }
      params[name] = value;
    };
    number(el.temperature, "temperature", false);
    number(el.topP, "top_p", false);
    number(el.maxTokens, "max_tokens", true);
    number(el.seed, "seed", true);
    return params;
  }

  // Server-sent events of a fetch response body: calls onData(JSON) per `data:` frame until [DONE];
  // returns whether [DONE] came.
  async function readEvents(resp, onData) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return false;
        buffer = (buffer + decoder.decode(value, { stream: true })).replace(/\r\n/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = event.split("\n").filter((line) => line.startsWith("data:"))
            .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
          if (!data) continue;            // a comment or keep-alive
          if (data === "[DONE]") return true;
          let parsed;
          try { parsed = JSON.parse(data); } catch (e) {
            throw new ApiError(`The stream sent a frame that is not JSON: ${data.slice(0, 200)}`);
          }
          onData(parsed);
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  function setRunning(running) {
    el.send.disabled = running;
    el.stop.disabled = !running;
    el.chatModel.disabled = running || !models.some(isChat);
  }

  function stat(label, value) {
    const span = document.createElement("span");
    span.className = "stat";
    const b = document.createElement("b");
    b.textContent = label;
    span.append(b, ` ${value}`);
    return span;
  }

  function showStats(target, figures) {
    target.replaceChildren(...figures.map(([label, value]) => stat(label, value)));
  }

  async function send() {
    if (controller) return;
    const text = el.prompt.value;
    if (!text.trim()) { el.prompt.focus(); return; }
    const model = el.chatModel.value;
    clearError();
    if (!model) { showError("No chat model to send to: check the API key, then Refresh models."); return; }
    let params;
    try { params = samplingParams(); } catch (e) { showError(describe(e)); return; }

    const system = el.system.value.trim();
    history.push({ role: "user", content: text });
    const userBubble = addMessage("user", text);
    el.prompt.value = "";
    const answer = addMessage("assistant", "");
    answer.root.classList.add("pending");
    el.stats.replaceChildren();

    const body = {
      model, stream: true, stream_options: { include_usage: true }, ...params,
      messages: [...(system ? [{ role: "system", content: system }] : []), ...history],
    };
    controller = new AbortController();
    setRunning(true);
    const sent = performance.now();
    let first = null, last = null, usage = null, finish = null, output = "";
    try {
      const resp = await fetch(API + "v1/chat/completions", {
        method: "POST", signal: controller.signal, body: JSON.stringify(body),
        headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders() },
      });
      if (!resp.ok) throw new ApiError(await readError(resp));
      const done = await readEvents(resp, (frame) => {
        if (frame.error) throw new ApiError(`The stream failed: ${formatError(frame.error)}`);
        if (frame.usage) usage = frame.usage;
        for (const choice of frame.choices || []) {
          const delta = choice.delta || {};
          if (delta.content) {
            const now = performance.now();
            if (first === null) first = now;
            last = now;
            output += delta.content;
            answer.content.textContent = output;
            answer.root.classList.remove("pending");
            scrollDown();
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      });
      if (!done) throw new ApiError("The stream ended before [DONE]: the connection closed early.");
      history.push({ role: "assistant", content: output });
      const figures = [["TTFT", first === null ? "–" : `${Math.round(first - sent)} ms`]];
      const seconds = first !== null && last > first ? (last - first) / 1000 : 0;
      const completion = usage ? usage.completion_tokens : null;
      figures.push(["tok/s", completion && seconds ? (completion / seconds).toFixed(1) : "–"]);
      if (usage) figures.push(["tokens", `${usage.prompt_tokens} prompt + ${completion} completion`]);
      figures.push(["total", `${((performance.now() - sent) / 1000).toFixed(2)} s`]);
      if (finish) figures.push(["finish", finish === "length" ? "length (max_tokens reached)" : finish]);
      showStats(el.stats, figures);
      answer.meta.textContent = figures.filter(([l]) => l === "TTFT" || l === "tok/s")
        .map(([l, v]) => (l === "tok/s" ? `${v} tok/s` : `${l} ${v}`)).join(" · ");
      if (!output) answer.content.textContent = "(empty answer)";
    } catch (e) {
      if (e && e.name === "AbortError") {
        // Stopped: what came so far stays in the conversation.
        history.push({ role: "assistant", content: output });
        answer.meta.textContent = "stopped";
        if (!output) answer.content.textContent = "(stopped before the first token)";
      } else {
        // Failed: the message was not answered, so it leaves the conversation and returns to the box.
        history.pop();
        if (output) history.push({ role: "user", content: text }, { role: "assistant", content: output });
        else {
          answer.root.remove();
          userBubble.root.classList.add("failed");
          userBubble.meta.textContent = "not answered";
          if (!el.prompt.value) el.prompt.value = text;
        }
        showError(describe(e));
      }
    } finally {
      answer.root.classList.remove("pending");
      controller = null;
      setRunning(false);
    }
  }

  el.form.addEventListener("submit", (event) => { event.preventDefault(); send(); });
  el.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); send(); }
  });
  el.stop.addEventListener("click", () => controller && controller.abort());
  el.clear.addEventListener("click", () => {
    if (controller) controller.abort();
    history = [];
    el.messages.replaceChildren();
    el.stats.replaceChildren();
    clearError();
  });
  el.errorClose.addEventListener("click", clearError);

  // ---- audio --------------------------------------------------------------------------------------

  let audio = null;      // {blob, name}: the chosen file or the last recording
  let recorder = null;

  function useAudio(blob, name, label) {
    audio = blob ? { blob, name } : null;
    el.audioSource.textContent = blob ? label : "No audio chosen.";
    if (el.audioPreview.src) URL.revokeObjectURL(el.audioPreview.src);
    el.audioPreview.hidden = !blob;
    if (blob) el.audioPreview.src = URL.createObjectURL(blob);
    else el.audioPreview.removeAttribute("src");
  }

  const kb = (bytes) => (bytes < 1024 * 1024 ? `${(bytes / 1024).toFixed(0)} KB`
                                             : `${(bytes / 1024 / 1024).toFixed(1)} MB`);

  el.audioFile.addEventListener("change", () => {
    const file = el.audioFile.files[0];
    useAudio(file || null, file ? file.name : "", file ? `File: ${file.name} (${kb(file.size)})` : "");
  });

  // Browsers give the microphone to secure pages only (https, or http on localhost).
  const canRecord = !!(navigator.mediaDevices && navigator.mediaDevices.getUserMedia) &&
                    typeof MediaRecorder !== "undefined";
  if (!canRecord) {
    el.record.disabled = true;
    el.recordNote.hidden = false;
    el.recordNote.textContent = "Recording is unavailable here: browsers allow the microphone only on " +
      "https or localhost pages. Choose a file instead.";
  }

  el.record.addEventListener("click", async () => {
    if (recorder) { recorder.stop(); return; }
    clearError();
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (e) {
      showError(`The microphone is not available: ${describe(e)}`);
      return;
    }
    const chunks = [];
    const started = performance.now();
    recorder = new MediaRecorder(stream);
    recorder.addEventListener("dataavailable", (event) => { if (event.data.size) chunks.push(event.data); });
    recorder.addEventListener("stop", () => {
      stream.getTracks().forEach((track) => track.stop());
      const type = recorder.mimeType || "audio/webm";
      const ext = type.includes("ogg") ? "ogg" : type.includes("mp4") ? "m4a" : "webm";
      const seconds = ((performance.now() - started) / 1000).toFixed(1);
      useAudio(new Blob(chunks, { type }), `recording.${ext}`, `Recording: ${seconds} s (${type})`);
      recorder = null;
      el.record.textContent = "● Record";
      el.record.classList.remove("recording");
    });
    recorder.start();
    el.record.textContent = "■ Stop recording";
    el.record.classList.add("recording");
  });

  el.transcribe.addEventListener("click", async () => {
    clearError();
    const model = el.audioModel.value;
    if (!model) { showError("No transcription model: check the API key, then Refresh models."); return; }
    if (!audio) { showError("Choose an audio file or record one first."); return; }
    const form = new FormData();
    form.append("file", audio.blob, audio.name);
    form.append("model", model);
    form.append("response_format", "json");
    const language = el.language.value.trim();
    if (language) form.append("language", language);
    el.transcribe.disabled = true;
    el.transcript.textContent = "";
    el.transcript.classList.add("pending");
    el.audioStats.textContent = "Transcribing…";
    const started = performance.now();
    try {
      const resp = await fetch(API + "v1/audio/transcriptions",
                               { method: "POST", body: form, headers: authHeaders() });
      if (!resp.ok) throw new ApiError(await readError(resp));
      const body = await resp.json();
      const elapsed = (performance.now() - started) / 1000;
      el.transcript.textContent = body.text || "";
      if (!body.text) el.transcript.textContent = "(no speech found)";
      const figures = [["elapsed", `${elapsed.toFixed(2)} s`]];
      if (body.usage && body.usage.seconds) {
        figures.push(["audio", `${body.usage.seconds.toFixed(1)} s`],
                     ["speed", `${(body.usage.seconds / elapsed).toFixed(1)}× real time`]);
      }
      showStats(el.audioStats, figures);
    } catch (e) {
      el.audioStats.textContent = "";
      showError(describe(e));
    } finally {
      el.transcript.classList.remove("pending");
      el.transcribe.disabled = false;
    }
  });

  loadModels();
})();
