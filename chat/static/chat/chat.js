// The room page: a client of the chat wire protocol v1 (docs/protocol.md).
//
// One socket, one room. Messages are kept on screen by seq; after a drop the
// client reconnects with backoff and joins with `since` = the highest seq it
// shows, so nothing is lost. Sends stay pending until acked and are retried
// with the same client_msg_id, which the server dedupes. A live seq that skips
// some (a broadcast lost between server and socket) is filled in with history.
//
// User-typed text only ever reaches the page through textContent.
(() => {
  "use strict";

  const config = JSON.parse(document.getElementById("chat-config").textContent);
  const ROOM = config.room;
  const ME = config.username;

  const HISTORY_PAGE = 50;
  const HISTORY_MAX = 100; // the largest page the server gives
  const GAP_WAIT_MS = 500;
  const BACKOFF_FIRST_MS = 500;
  const BACKOFF_MAX_MS = 10000;
  const FIRST_AFTER_1001_MS = 2000; // a deploy: every tab's first retry spread over this
  const TYPING_EVERY_MS = 3000;
  const TYPING_SHOWN_MS = 4000;
  const READ_DEBOUNCE_MS = 1000;
  const STATUS_SHOWN_MS = 5000;
  const MAX_BODY = 4000;

  const $ = (id) => document.getElementById(id);
  const ui = {
    state: $("connection-state"),
    messages: $("messages"),
    older: $("load-older"),
    online: $("online"),
    onlineCount: $("online-count"),
    onlineMore: $("online-more"),
    typing: $("typing"),
    status: $("status"),
    form: $("composer"),
    input: $("message-input"),
    send: $("send-button"),
  };
  const timeline = ui.messages.parentElement;

  let socket = null;
  let heartbeatMs = 30000;
  let lastSentAt = 0;
  let attempt = 0; // reconnect attempts since the last good join
  let reconnectTimer = null;
  let countdownTimer = null;
  let closeCode = null; // of the socket that closed last
  let stopped = false; // no more reconnects: page left, banned, replaced
  let joined = false;
  let snapshotLoaded = false; // the first history page is on screen
  let hasMore = false;
  let recoveringSince = null;
  let refCounter = 0;

  const shown = new Map(); // seq -> message element
  const pending = new Map(); // client_msg_id -> {body, ref, el, sent}
  const refs = new Map(); // ref of a pending send -> client_msg_id
  const gaps = new Map(); // ref of a history that fills a gap -> {low, before, limit}
  // Who is online in the room: the names we know, and how many there are. In
  // a big room joined lists at most 100 names, so onlineCount can be higher
  // than online.size; presence_batch brings the exact count each time.
  const online = new Set();
  let onlineCount = null; // null: not joined
  const typers = new Map(); // username -> timer
  let lastTypingAt = 0;
  let readSent = 0;
  let readTimer = null;
  let statusTimer = null;

  // --- connection ----------------------------------------------------------

  function setState(state, text) {
    ui.state.dataset.state = state;
    ui.state.textContent = text || state;
  }

  function socketUrl() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return `${scheme}//${location.host}/ws/`;
  }

  function connect() {
    clearTimeout(reconnectTimer);
    clearInterval(countdownTimer);
    if (stopped) return;
    if (attempt === 0) setState("connecting", "connecting…");
    else setState("reconnecting", "reconnecting…");
    const ws = new WebSocket(socketUrl(), ["chat.v1"]);
    socket = ws;
    ws.onmessage = (event) => {
      if (typeof event.data !== "string") return; // we never ask for binary
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      const handler = handlers[frame.type];
      if (handler) handler(frame);
      // Page scripts (sidebar.js) see every frame after this page has.
      document.dispatchEvent(new CustomEvent("chat:frame", { detail: frame }));
    };
    ws.onclose = (event) => {
      if (socket !== ws) return;
      socket = null;
      joined = false;
      online.clear();
      onlineCount = null;
      renderOnline();
      onClosed(event);
    };
  }

  function onClosed(event) {
    if (event.code === 4403) {
      stopped = true;
      setState("offline", "offline");
      showStatus(`You were disconnected${event.reason ? `: ${event.reason}` : "."}`, 0);
      return;
    }
    if (event.code === 4409) {
      stopped = true;
      setState("offline", "offline");
      showStatus("This page was opened elsewhere.", 0);
      return;
    }
    closeCode = event.code;
    scheduleReconnect();
  }

  // Full jitter: anywhere in [0, ceiling), so tabs dropped together come back
  // apart. After a 1001 (server going away) the first retry is spread over
  // FIRST_AFTER_1001_MS: another process is up already. `random` is in [0, 1).
  function reconnectDelay(attempt, closeCode, random) {
    if (attempt === 0 && closeCode === 1001) return Math.floor(random * FIRST_AFTER_1001_MS);
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** attempt);
    return Math.floor(random * ceiling);
  }

  function scheduleReconnect() {
    if (stopped) return;
    if (!navigator.onLine) {
      setState("offline", "offline");
      return; // the browser's "online" event reconnects
    }
    const delay = reconnectDelay(attempt, closeCode, Math.random());
    attempt += 1;
    const due = Date.now() + delay;
    const tick = () => {
      const seconds = Math.max(1, Math.ceil((due - Date.now()) / 1000));
      setState("reconnecting", `reconnecting in ${seconds}s`);
    };
    tick();
    countdownTimer = setInterval(tick, 250);
    reconnectTimer = setTimeout(connect, delay);
  }

  function reconnectNow() {
    if (socket || stopped) return;
    attempt = 0;
    connect();
  }

  function send(frame) {
    if (!socket || socket.readyState !== WebSocket.OPEN) return false;
    socket.send(JSON.stringify(frame));
    lastSentAt = Date.now();
    return true;
  }

  function nextRef(kind) {
    refCounter += 1;
    return `${kind}-${refCounter}`;
  }

  // What page scripts may use: who and where we are, and this page's socket.
  // Their refs start with "page-" (nextRef gives them): this page leaves the
  // replies, errors included, to them.
  window.chatsite = Object.freeze({
    room: ROOM,
    me: ME,
    send: (frame) => send(frame),
    nextRef: (kind) => nextRef(`page-${kind}`),
  });

  // Heartbeat: anything counts; send a ping after half the heartbeat of silence.
  setInterval(() => {
    if (socket && socket.readyState === WebSocket.OPEN && Date.now() - lastSentAt >= heartbeatMs / 2) {
      send({ type: "ping" });
    }
  }, 1000);

  // --- frames from the server ----------------------------------------------

  const handlers = {
    hello(frame) {
      heartbeatMs = (frame.heartbeat || 30) * 1000;
      const join = { type: "join", room: ROOM, ref: nextRef("join") };
      if (snapshotLoaded) {
        join.since = highestSeq();
        recoveringSince = join.since;
      }
      send(join);
    },

    joined(frame) {
      if (frame.room !== ROOM) return;
      joined = true;
      attempt = 0;
      setState("online", "online");
      online.clear();
      for (const name of frame.online || []) online.add(name);
      online.add(ME); // a big room's list may leave us out; we are counted
      onlineCount = Math.max(countOr(frame.online_count, 0), online.size);
      renderOnline();
      ui.input.disabled = Boolean(frame.closed);
      ui.send.disabled = Boolean(frame.closed);
      if (frame.closed) showStatus("This room is closed: it takes no new messages.", 0);
      if (!snapshotLoaded) {
        send({ type: "history", room: ROOM, limit: HISTORY_PAGE, ref: nextRef("history") });
      }
      // Requests the last socket took with it: the recovery covers only newer seqs.
      const unanswered = [...gaps.values()];
      gaps.clear();
      for (const gap of unanswered) fillGap(gap.low, gap.before);
      for (const clientMsgId of pending.keys()) transmit(clientMsgId);
    },

    history(frame) {
      if (frame.room !== ROOM) return;
      const gap = gaps.get(frame.ref);
      if (gap) {
        gaps.delete(frame.ref);
        gapFilled(frame, gap);
        return;
      }
      keepScroll(() => {
        for (const payload of frame.messages) upsertMessage(payload);
      }, !snapshotLoaded);
      snapshotLoaded = true;
      hasMore = frame.has_more;
      ui.older.hidden = !hasMore;
      ui.older.disabled = false;
      scheduleRead();
    },

    message(frame) {
      if (frame.room !== ROOM) return;
      watchForGap(frame.seq);
      followBottom(() => upsertMessage(frame));
      stopTyping(frame.user.username);
      scheduleRead();
    },

    recovered(frame) {
      if (frame.room !== ROOM) return;
      if (!frame.complete && recoveringSince !== null) {
        // More were missed than the server replays: drop what we had before the
        // gap, so the screen stays contiguous, and let "Load older" page back.
        gaps.clear();
        for (const [seq, el] of shown) {
          if (seq <= recoveringSince) {
            el.remove();
            shown.delete(seq);
          }
        }
        hasMore = true;
        ui.older.hidden = false;
      }
      recoveringSince = null;
    },

    ack(frame) {
      const clientMsgId = frame.client_msg_id || refs.get(frame.ref);
      refs.delete(frame.ref);
      const item = pending.get(clientMsgId);
      if (!item) return;
      pending.delete(clientMsgId);
      if (!shown.has(frame.seq)) {
        watchForGap(frame.seq);
        // The ack beat the broadcast: show it now; the `message` frame updates it.
        followBottom(() =>
          upsertMessage({
            id: frame.id,
            seq: frame.seq,
            user: { username: ME },
            body: item.body,
            created_at: new Date().toISOString(),
            client_msg_id: clientMsgId,
            edited_at: null,
            deleted: false,
          }),
        );
      }
      item.el.remove();
    },

    message_edited(frame) {
      if (frame.room !== ROOM) return;
      const el = shown.get(frame.seq);
      if (!el) return;
      el.querySelector(".body").textContent = frame.body;
      el.querySelector(".edited").hidden = false;
    },

    message_deleted(frame) {
      if (frame.room !== ROOM) return;
      const el = shown.get(frame.seq);
      if (el) markDeleted(el);
    },

    // Up to 50 users online: one frame per change; the count follows it.
    presence(frame) {
      if (frame.room !== ROOM || onlineCount === null) return; // joined lists it
      if (frame.status === "online") {
        if (!online.has(frame.user)) {
          online.add(frame.user);
          onlineCount += 1;
        }
      } else if (online.delete(frame.user) || onlineCount > online.size) {
        onlineCount -= 1; // a user we knew, or one of those we had no name for
      }
      onlineCount = Math.max(onlineCount, online.size);
      renderOnline();
      if (frame.status === "offline") stopTyping(frame.user);
    },

    // Above 50: who came and who went in the last second, and the exact count.
    presence_batch(frame) {
      if (frame.room !== ROOM || onlineCount === null) return;
      for (const name of frame.online || []) online.add(name);
      for (const name of frame.offline || []) {
        online.delete(name);
        stopTyping(name);
      }
      onlineCount = countOr(frame.online_count, Math.max(onlineCount, online.size));
      renderOnline();
    },

    typing(frame) {
      if (frame.room !== ROOM || frame.user === ME) return;
      clearTimeout(typers.get(frame.user));
      typers.set(frame.user, setTimeout(() => stopTyping(frame.user), TYPING_SHOWN_MS));
      renderTyping();
    },

    removed(frame) {
      if (frame.room !== ROOM) return;
      joined = false;
      ui.input.disabled = true;
      ui.send.disabled = true;
      setState("offline", "removed");
      showStatus(`You were removed from this room: ${frame.reason}`, 0);
    },

    error(frame) {
      const gap = gaps.get(frame.ref);
      if (gap) {
        gaps.delete(frame.ref);
        const retryMs = (frame.retry_after || 1) * 1000;
        if (frame.code === "rate_limited") setTimeout(() => fillGap(gap.low, gap.before), retryMs);
        return;
      }
      const clientMsgId = refs.get(frame.ref);
      if (clientMsgId !== undefined) {
        refs.delete(frame.ref);
        sendFailed(clientMsgId, frame);
        return;
      }
      if (frame.ref && frame.ref.startsWith("page-")) return; // a page script's
      if (frame.ref && frame.ref.startsWith("history")) ui.older.disabled = false;
      if (frame.ref && frame.ref.startsWith("join")) {
        showStatus(frame.message, 0);
        if (frame.code === "not_found" || frame.code === "forbidden") {
          stopped = true; // no retry can fix these
          setState("offline", "offline");
          ui.input.disabled = true;
          ui.send.disabled = true;
        }
        socket?.close(4000); // otherwise: reconnect with backoff and join again
        return;
      }
      showStatus(frame.message);
    },

    push(frame) {
      // Server-side code talks to pages through these; let page scripts listen.
      document.dispatchEvent(new CustomEvent("chat:push", { detail: frame }));
    },

    pong() {},
  };

  // --- the message list ----------------------------------------------------

  function highestSeq() {
    let high = 0;
    for (const seq of shown.keys()) if (seq > high) high = seq;
    return high;
  }

  function lowestSeq() {
    let low = Infinity;
    for (const seq of shown.keys()) if (seq < low) low = seq;
    return low === Infinity ? null : low;
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function formatTime(iso) {
    const date = new Date(iso);
    if (Number.isNaN(date.getTime())) return "";
    return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function buildMessage(author, body, createdAt) {
    const item = el("li", "message");
    const meta = el("div", "meta");
    meta.append(el("span", "author", author));
    const time = el("time", "time", formatTime(createdAt));
    time.dateTime = createdAt;
    meta.append(time);
    const edited = el("span", "edited", "(edited)");
    edited.hidden = true;
    meta.append(edited);
    meta.append(el("span", "actions"));
    item.append(meta, el("div", "body", body));
    if (author === ME) item.classList.add("own");
    return item;
  }

  function upsertMessage(payload) {
    let item = shown.get(payload.seq);
    if (!item) {
      item = buildMessage(payload.user.username, payload.body, payload.created_at);
      item.dataset.seq = payload.seq;
      insertInOrder(item, payload.seq);
      shown.set(payload.seq, item);
    }
    item.dataset.id = payload.id;
    item.querySelector(".body").textContent = payload.body;
    item.querySelector(".edited").hidden = !payload.edited_at;
    if (payload.deleted) {
      markDeleted(item);
    } else if (payload.user.username === ME) {
      addOwnActions(item);
    }
    // Our own message seen through history or recovery settles its pending copy.
    const twin = pending.get(payload.client_msg_id);
    if (twin && payload.user.username === ME) {
      pending.delete(payload.client_msg_id);
      refs.delete(twin.ref);
      twin.el.remove();
    }
  }

  function insertInOrder(item, seq) {
    // Pending messages stay at the bottom, after every stored one.
    let before = ui.messages.querySelector(".message.pending");
    for (const child of ui.messages.querySelectorAll(".message[data-seq]")) {
      if (Number(child.dataset.seq) > seq) {
        before = child;
        break;
      }
    }
    ui.messages.insertBefore(item, before);
  }

  // A live seq beyond the highest shown + 1: the messages between were stored but
  // their broadcast never reached this socket (an expired layer message, say).
  // Not before the first page or during a recovery: those bring them anyway.
  function watchForGap(seq) {
    const high = highestSeq();
    if (!snapshotLoaded || recoveringSince !== null || seq <= high + 1) return;
    // With several server processes writing, a late one may still come: wait a bit.
    setTimeout(() => fillGap(high, seq), GAP_WAIT_MS);
  }

  // Ask history for what is still missing after seq `low` and before `before`.
  function fillGap(low, before) {
    while (low + 1 < before && shown.has(low + 1)) low += 1;
    while (low + 1 < before && shown.has(before - 1)) before -= 1;
    if (low + 1 >= before) return;
    const limit = Math.min(HISTORY_MAX, before - low - 1);
    const ref = nextRef("gap");
    gaps.set(ref, { low, before, limit }); // unsent (no socket): asked again on join
    send({ type: "history", room: ROOM, before, limit, ref });
  }

  function gapFilled(frame, gap) {
    const found = frame.messages.filter((m) => m.seq > gap.low && m.seq < gap.before);
    followBottom(() => {
      for (const payload of found) if (!shown.has(payload.seq)) upsertMessage(payload);
    });
    scheduleRead();
    // A short page reached below the gap: the seqs it lacks were removed for good.
    // A full one may have more under it; each page ends lower, so this ends.
    if (found.length === gap.limit) fillGap(gap.low, found[0].seq);
  }

  function markDeleted(item) {
    item.classList.add("deleted");
    item.querySelector(".body").textContent = "message deleted";
    item.querySelector(".edited").hidden = true;
    item.querySelector(".actions").replaceChildren();
  }

  function addOwnActions(item) {
    const actions = item.querySelector(".actions");
    if (actions.childElementCount) return;
    const edit = el("button", "edit", "Edit");
    edit.type = "button";
    edit.addEventListener("click", () => editMessage(item));
    const remove = el("button", "delete", "Delete");
    remove.type = "button";
    remove.addEventListener("click", () => deleteMessage(item));
    actions.append(edit, remove);
  }

  function editMessage(item) {
    const current = item.querySelector(".body").textContent;
    const body = window.prompt("Edit your message", current);
    if (body === null || body.trim() === "" || body === current) return;
    if (body.length > MAX_BODY) {
      showStatus(`A message has at most ${MAX_BODY} characters.`);
      return;
    }
    const frame = { type: "edit", room: ROOM, id: Number(item.dataset.id), body, ref: nextRef("edit") };
    if (!joined || !send(frame)) showStatus("Not connected: try again in a moment.");
  }

  function deleteMessage(item) {
    if (!window.confirm("Delete this message for everyone?")) return;
    const frame = { type: "delete", room: ROOM, id: Number(item.dataset.id), ref: nextRef("delete") };
    if (!joined || !send(frame)) showStatus("Not connected: try again in a moment.");
  }

  function nearBottom() {
    return timeline.scrollHeight - timeline.scrollTop - timeline.clientHeight < 80;
  }

  function followBottom(change) {
    const stick = nearBottom();
    change();
    if (stick) timeline.scrollTop = timeline.scrollHeight;
  }

  // Older messages go above: keep what the reader looks at in place.
  function keepScroll(change, toBottom) {
    const fromBottom = timeline.scrollHeight - timeline.scrollTop;
    change();
    timeline.scrollTop = toBottom ? timeline.scrollHeight : timeline.scrollHeight - fromBottom;
  }

  ui.older.addEventListener("click", () => {
    const before = lowestSeq();
    const frame = { type: "history", room: ROOM, limit: HISTORY_PAGE, ref: nextRef("history") };
    if (before !== null) frame.before = before;
    if (send(frame)) ui.older.disabled = true;
  });

  // --- sending ---------------------------------------------------------------

  function newClientMsgId() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function transmit(clientMsgId) {
    const item = pending.get(clientMsgId);
    if (!item || !joined) return;
    refs.delete(item.ref);
    item.ref = nextRef("send");
    refs.set(item.ref, clientMsgId);
    send({ type: "send", room: ROOM, body: item.body, client_msg_id: clientMsgId, ref: item.ref });
  }

  function sendFailed(clientMsgId, frame) {
    const item = pending.get(clientMsgId);
    if (!item) return;
    if (frame.code === "rate_limited") {
      setTimeout(() => transmit(clientMsgId), (frame.retry_after || 1) * 1000);
      return;
    }
    pending.delete(clientMsgId);
    item.el.classList.remove("pending");
    item.el.classList.add("failed");
    const actions = item.el.querySelector(".actions");
    actions.replaceChildren(el("span", "failure", `not sent: ${frame.message}`));
    const discard = el("button", "discard", "Discard");
    discard.type = "button";
    discard.addEventListener("click", () => item.el.remove());
    actions.append(discard);
  }

  function submit() {
    const body = ui.input.value.trim();
    if (!body) return;
    if (body.length > MAX_BODY) {
      showStatus(`A message has at most ${MAX_BODY} characters.`);
      return;
    }
    const clientMsgId = newClientMsgId();
    const item = buildMessage(ME, body, new Date().toISOString());
    item.classList.add("pending");
    item.dataset.clientMsgId = clientMsgId;
    item.querySelector(".actions").append(el("span", "sending", "sending…"));
    ui.messages.append(item);
    timeline.scrollTop = timeline.scrollHeight;
    pending.set(clientMsgId, { body, ref: null, el: item });
    ui.input.value = "";
    lastTypingAt = 0;
    transmit(clientMsgId); // not joined yet: sent on (re)join
  }

  ui.form.addEventListener("submit", (event) => {
    event.preventDefault();
    submit();
  });

  ui.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submit();
    }
  });

  ui.input.addEventListener("input", () => {
    const now = Date.now();
    if (!joined || !ui.input.value || now - lastTypingAt < TYPING_EVERY_MS) return;
    lastTypingAt = now;
    send({ type: "typing", room: ROOM });
  });

  // --- presence, typing, read marker, status ---------------------------------

  function countOr(value, fallback) {
    return Number.isSafeInteger(value) && value >= 0 ? value : fallback;
  }

  // The names we know, sorted, then "and N more" for those we have no name for.
  function renderOnline() {
    const names = [...online].sort((a, b) => a.localeCompare(b));
    ui.online.replaceChildren(
      ...names.map((name) => {
        const item = el("li", name === ME ? "me" : "", name);
        item.dataset.user = name;
        return item;
      }),
    );
    const unnamed = onlineCount === null ? 0 : Math.max(0, onlineCount - names.length);
    ui.onlineCount.textContent = onlineCount === null ? "" : String(onlineCount);
    ui.onlineMore.textContent = unnamed ? `and ${unnamed} more` : "";
    ui.onlineMore.hidden = !unnamed;
  }

  function stopTyping(name) {
    if (!typers.has(name)) return;
    clearTimeout(typers.get(name));
    typers.delete(name);
    renderTyping();
  }

  function renderTyping() {
    const names = [...typers.keys()].sort();
    let text = "";
    if (names.length === 1) text = `${names[0]} is typing…`;
    else if (names.length === 2) text = `${names[0]} and ${names[1]} are typing…`;
    else if (names.length > 2) text = "Several people are typing…";
    ui.typing.textContent = text;
  }

  function scheduleRead() {
    clearTimeout(readTimer);
    readTimer = setTimeout(() => {
      const seq = highestSeq();
      if (joined && !document.hidden && seq > readSent && send({ type: "read", room: ROOM, seq })) {
        readSent = seq;
      }
    }, READ_DEBOUNCE_MS);
  }

  function showStatus(text, forMs = STATUS_SHOWN_MS) {
    clearTimeout(statusTimer);
    ui.status.textContent = text;
    if (forMs) statusTimer = setTimeout(() => (ui.status.textContent = ""), forMs);
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) scheduleRead();
  });
  window.addEventListener("online", reconnectNow);
  window.addEventListener("offline", () => {
    if (!socket) {
      clearTimeout(reconnectTimer);
      clearInterval(countdownTimer);
      setState("offline", "offline");
    }
  });
  window.addEventListener("pagehide", () => {
    stopped = true;
    socket?.close(1000);
  });
  window.addEventListener("pageshow", (event) => {
    if (event.persisted) {
      stopped = false;
      reconnectNow();
    }
  });

  // For tests: the pure parts, and the constants they use.
  window.chatsite = { reconnectDelay, BACKOFF_FIRST_MS, BACKOFF_MAX_MS, FIRST_AFTER_1001_MS };

  connect();
})();
