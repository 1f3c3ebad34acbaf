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
    attach: $("attach-button"),
    file: $("file-input"),
    chips: $("attachment-chips"),
    mentionList: $("mention-list"),
    thread: $("thread"),
    threadParent: $("thread-parent"),
    threadOlder: $("thread-older"),
    threadMessages: $("thread-messages"),
    threadForm: $("thread-composer"),
    threadInput: $("thread-input"),
    threadClose: $("thread-close"),
    timeline: $("timeline"),
    banner: $("banner"),
    bannerText: $("banner-text"),
    bannerRetry: $("banner-retry"),
    bannerLink: $("banner-link"),
    empty: $("empty-room"),
    jump: $("jump-latest"),
    announce: $("announce"),
    count: $("composer-count"),
    people: $("people"),
    peopleToggle: $("people-toggle"),
    peopleToggleCount: $("people-toggle-count"),
    membersSection: $("members-section"),
    members: $("members"),
    membersCount: $("members-count"),
    inviteForm: $("invite-form"),
    inviteInput: $("invite-input"),
    inviteStatus: $("invite-status"),
    leave: $("leave-room"),
    confirm: $("confirm"),
    confirmText: $("confirm-text"),
    confirmOk: $("confirm-ok"),
  };
  const EMOJI = ["👍", "❤️", "😂", "🎉", "😮", "😢"];
  const REACTION_USERS_MAX = 20; // as the server keeps
  const IMAGE_TYPES = new Set(["image/png", "image/jpeg", "image/gif", "image/webp"]);
  const JUMP_CONTEXT = 25; // older messages shown above a message jumped to
  const timeline = ui.timeline;
  const GROUP_WITHIN_MS = 5 * 60 * 1000; // one author's messages this close read as one block
  const COUNT_FROM = MAX_BODY - 500; // the composer's counter shows from here
  const OLDER_WHEN_PX = 300; // load older history when scrolled this close to the top

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
  // The lowest seq the room's history pages brought, replies included: a page
  // of replies only shows nothing in the timeline, yet the next page is older.
  let pagedFrom = null;
  let hasMore = false;
  let recoveringSince = null;
  let refCounter = 0;

  const shown = new Map(); // seq -> message element
  // Replies live in their thread, not in the timeline: their seqs are kept
  // here so the gap fill and the recovery still see the room's seqs whole.
  const replySeqs = new Set();
  const messages = new Map(); // id -> the latest message object we have
  // target: the seq of a reply jumped to, until its page of the thread is shown.
  const thread = { id: null, el: null, shown: new Map(), hasMore: false, ref: null, target: null };
  let jumpSeq = hashSeq(); // #m<seq>: the message to show on the first page
  let lastSeqAtJoin = 0;
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
  let roomClosed = false;

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
    let opened = false;
    ws.onopen = () => {
      opened = true;
    };
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
      onClosed(event, opened);
    };
  }

  // A close the page cannot come back from by itself: say why, keep what was
  // typed, and fail what was waiting to be sent (the server never took it).
  function stop(kind, text, options) {
    stopped = true;
    clearTimeout(reconnectTimer);
    clearInterval(countdownTimer);
    setState("offline", "offline");
    setWritable(false);
    failPending("not sent: disconnected");
    showBanner(kind, text, options);
  }

  function onClosed(event, opened) {
    const reason = event.reason || "";
    if (event.code === 4403) {
      if (reason === "signed out") {
        stop("signed-out", "You signed out of this session.", { link: signInLink() });
      } else if (reason.startsWith("banned: ")) {
        stop("banned", `You are banned from this site: ${reason.slice("banned: ".length)}`);
        explainBan(); // the HTTP side says until when
      } else if (reason.startsWith("kicked by a moderator")) {
        stop("kicked", `A moderator disconnected you${reason.slice("kicked by a moderator".length)}.`, {
          retry: "Reconnect",
        });
      } else {
        stop("removed", `You were disconnected${reason ? `: ${reason}` : "."}`);
      }
      return;
    }
    if (event.code === 4409) {
      stop("replaced", "This room was opened in another window or tab, so this one stopped.", {
        retry: "Use it here",
      });
      return;
    }
    closeCode = event.code;
    // Refused before it opened (the handshake's 403 shows as 1006): ask why.
    if (!opened) explainRefusal();
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
      showBanner("reconnecting", "You are offline. The chat comes back when the network does.", { retry: "Retry now" });
      return; // the browser's "online" event reconnects
    }
    const delay = reconnectDelay(attempt, closeCode, Math.random());
    attempt += 1;
    const due = Date.now() + delay;
    const tick = () => {
      const seconds = Math.max(1, Math.ceil((due - Date.now()) / 1000));
      setState("reconnecting", `reconnecting in ${seconds}s`);
      // A blip (the first quick retry) is not worth a banner.
      if (attempt > 1 || delay >= 1000) {
        showBanner("reconnecting", `Connection lost. Reconnecting in ${seconds}s…`, { retry: "Retry now" });
      }
    };
    tick();
    countdownTimer = setInterval(tick, 250);
    reconnectTimer = setTimeout(connect, delay);
  }

  function reconnectNow() {
    if (socket) return;
    stopped = false;
    attempt = 0;
    hideBanner();
    setWritable(!roomClosed);
    connect();
  }

  function signInLink() {
    return { href: `/accounts/login/?next=${encodeURIComponent(location.pathname)}`, text: "Sign in" };
  }

  // What the site's HTTP side says of us: signed in? banned until when?
  async function whoAmI() {
    try {
      const response = await fetch("/api/me", { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (!response.ok) return null;
      return await response.json();
    } catch {
      return null; // the server is down: keep reconnecting
    }
  }

  // " until <local date and time>", or "" for no end (or none we can read).
  function untilText(iso) {
    const end = iso ? new Date(iso) : null;
    if (!end || Number.isNaN(end.getTime())) return "";
    return ` until ${end.toLocaleString([], { dateStyle: "medium", timeStyle: "short" })}`;
  }

  function banText(ban) {
    return `You are banned from this site${untilText(ban.until)}: ${ban.reason}`;
  }

  async function explainBan() {
    const me = await whoAmI();
    if (me && me.banned) showBanner("banned", banText(me.banned));
  }

  async function explainRefusal() {
    const me = await whoAmI();
    if (!me || socket) return;
    if (me.user === null) {
      stop("signed-out", "You are signed out.", { link: signInLink() });
    } else if (me.banned) {
      stop("banned", banText(me.banned));
    }
  }

  // One banner at a time: the more serious state wins until it is over.
  const BANNER_RANK = { reconnecting: 1, muted: 2, closed: 3, kicked: 4, replaced: 4, removed: 4, banned: 5, "signed-out": 5 };

  function showBanner(kind, text, { retry = null, link = null } = {}) {
    const current = ui.banner.hidden ? null : ui.banner.dataset.kind;
    if (current && current !== kind && BANNER_RANK[current] > BANNER_RANK[kind]) return;
    ui.banner.dataset.kind = kind;
    ui.bannerText.textContent = text;
    ui.bannerRetry.hidden = !retry;
    if (retry) ui.bannerRetry.textContent = retry;
    ui.bannerLink.hidden = !link;
    if (link) {
      ui.bannerLink.href = link.href;
      ui.bannerLink.textContent = link.text;
    }
    ui.banner.hidden = false;
  }

  // Hide the banner, or only if it is of `kind`.
  function hideBanner(kind = null) {
    if (kind === null || ui.banner.dataset.kind === kind) ui.banner.hidden = true;
  }

  ui.bannerRetry.addEventListener("click", reconnectNow);

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
  // For tests too: the pure parts, and the constants they use (one object:
  // assigning a second one would take send and nextRef from page scripts).
  window.chatsite = Object.freeze({
    room: ROOM,
    me: ME,
    send: (frame) => send(frame),
    nextRef: (kind) => nextRef(`page-${kind}`),
    reconnectDelay: (...args) => reconnectDelay(...args),
    BACKOFF_FIRST_MS,
    BACKOFF_MAX_MS,
    FIRST_AFTER_1001_MS,
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
      lastSeqAtJoin = countOr(frame.last_seq, 0);
      setState("online", "online");
      online.clear();
      for (const name of frame.online || []) online.add(name);
      online.add(ME); // a big room's list may leave us out; we are counted
      onlineCount = Math.max(countOr(frame.online_count, 0), online.size);
      renderOnline();
      // After the join: entering a public room makes us a member.
      if (members === null || !members.includes(ME)) loadPeople();
      hideBanner("reconnecting");
      roomClosed = Boolean(frame.closed);
      setWritable(!roomClosed);
      if (roomClosed) {
        if (ui.banner.hidden || ui.banner.dataset.kind !== "closed") {
          showBanner("closed", "This room is closed: you can read it, but it takes no new messages.");
        }
      } else {
        hideBanner("closed");
      }
      if (!snapshotLoaded) {
        const first = { type: "history", room: ROOM, limit: HISTORY_PAGE, ref: nextRef("history") };
        // #m<seq>: the page that holds it, with some older ones above it. The
        // newer ones come with the live timeline: a join with `since` recovers
        // whatever is above the page (see `recovered`), so it stays contiguous.
        if (jumpSeq !== null && frame.last_seq > jumpSeq + JUMP_CONTEXT) {
          first.before = jumpSeq + JUMP_CONTEXT + 1;
          first.limit = JUMP_CONTEXT * 2;
          jumpAfter = jumpSeq + JUMP_CONTEXT;
        }
        send(first);
      }
      // Requests the last socket took with it: the recovery covers only newer seqs.
      const unanswered = [...gaps.values()];
      gaps.clear();
      for (const gap of unanswered) fillGap(gap.low, gap.before);
      for (const clientMsgId of pending.keys()) transmit(clientMsgId);
    },

    history(frame) {
      if (frame.room !== ROOM) return;
      if (frame.thread !== undefined && frame.thread !== null) {
        threadPage(frame);
        return;
      }
      const gap = gaps.get(frame.ref);
      if (gap) {
        gaps.delete(frame.ref);
        gapFilled(frame, gap);
        return;
      }
      const first = !snapshotLoaded;
      keepScroll(() => {
        for (const payload of frame.messages) upsertMessage(payload);
      }, first);
      for (const payload of frame.messages) {
        if (pagedFrom === null || payload.seq < pagedFrom) pagedFrom = payload.seq;
      }
      snapshotLoaded = true;
      if (first && jumpSeq !== null) {
        jumpTo(jumpSeq);
        // The newer ones, up to the room's last seq at the join, as a gap fill.
        if (jumpAfter !== null) fillGap(highestSeq(), lastSeqAtJoin + 1);
      }
      hasMore = frame.has_more;
      ui.older.hidden = !hasMore;
      ui.older.disabled = false;
      renderEmpty();
      scheduleRead();
      // A first page shorter than the window cannot be scrolled: page on.
      if (hasMore && timeline.scrollHeight <= timeline.clientHeight) loadOlder();
    },

    message(frame) {
      if (frame.room !== ROOM) return;
      watchForGap(frame.seq);
      if (frame.reply_to && !replySeqs.has(frame.seq) && !messages.has(frame.id)) {
        bumpReplies(frame.reply_to);
      }
      const fresh = !shown.has(frame.seq) && !replySeqs.has(frame.seq);
      const atBottom = nearBottom();
      followBottom(() => upsertMessage(frame));
      if (fresh && frame.user.username !== ME) {
        if (!frame.reply_to && !atBottom) {
          unseen += 1;
          renderJump();
        }
        announce(`${frame.user.username}: ${frame.body.slice(0, 300)}`);
      }
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
            removeItem(el);
            shown.delete(seq);
          }
        }
        pagedFrom = null;
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
      if (item.replyTo) {
        if (!replySeqs.has(frame.seq)) {
          watchForGap(frame.seq);
          bumpReplies(item.replyTo);
          upsertMessage({
            id: frame.id,
            seq: frame.seq,
            user: { username: ME },
            body: item.body,
            created_at: new Date().toISOString(),
            client_msg_id: clientMsgId,
            edited_at: null,
            deleted: false,
            reply_to: item.replyTo,
            attachments: item.attachments,
          });
        }
      } else if (!shown.has(frame.seq)) {
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
            attachments: item.attachments,
          }),
        );
      }
      removeItem(item.el);
    },

    message_edited(frame) {
      if (frame.room !== ROOM) return;
      const known = messages.get(frame.id);
      if (known) {
        known.body = frame.body;
        known.mentions = frame.mentions || [];
      }
      for (const el of elementsOf(frame.seq)) {
        renderBody(el.querySelector(".body"), frame.body);
        el.querySelector(".edited").hidden = false;
        if (known) markMentionOfMe(el, known);
      }
    },

    message_deleted(frame) {
      if (frame.room !== ROOM) return;
      for (const el of elementsOf(frame.seq)) markDeleted(el);
    },

    reaction(frame) {
      if (frame.room !== ROOM) return;
      const known = messages.get(frame.id);
      if (!known) return;
      const list = known.reactions || (known.reactions = []);
      let entry = list.find((r) => r.emoji === frame.emoji);
      if (!entry) {
        entry = { emoji: frame.emoji, count: 0, users: [] };
        list.push(entry);
      }
      entry.count = frame.count;
      const users = entry.users.filter((name) => name !== frame.user);
      if (frame.on) users.push(frame.user);
      entry.users = users.slice(0, REACTION_USERS_MAX);
      if (entry.count <= 0) list.splice(list.indexOf(entry), 1);
      for (const el of elementsOf(frame.seq)) renderReactions(el, known);
    },

    // Up to 50 users online: one frame per change; the count follows it.
    presence(frame) {
      if (frame.room !== ROOM || onlineCount === null) return; // joined lists it
      if (frame.status === "online") {
        if (members && !members.includes(frame.user)) refreshPeople();
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
      const reason = String(frame.reason || "");
      if (reason.startsWith("room closed")) {
        // Read-only from now on. Join again to stay in the room: its
        // reopening is pushed to the sockets in it.
        roomClosed = true;
        setWritable(false);
        const why = reason.slice("room closed".length).replace(/^: /, "");
        showBanner(
          "closed",
          `This room was closed${why ? `: ${why}` : ""}. You can read it, but it takes no new messages.`,
        );
        failPending("not sent: the room is closed");
        const rejoin = { type: "join", room: ROOM, ref: nextRef("join"), since: highestSeq() };
        recoveringSince = rejoin.since;
        send(rejoin);
        return;
      }
      stopped = true;
      setState("offline", "removed");
      setWritable(false);
      failPending("not sent: you left the room");
      showBanner("removed", `You were removed from this room: ${reason}`);
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
      if (frame.ref && frame.ref.startsWith("thread")) ui.threadOlder.disabled = false;
      if (frame.ref && frame.ref.startsWith("join")) {
        if (frame.code === "not_found" || frame.code === "forbidden") {
          stop("removed", frame.message); // no retry can fix these
        } else {
          showStatus(frame.message, 0);
        }
        socket?.close(4000); // otherwise: reconnect with backoff and join again
        return;
      }
      showStatus(frame.message);
    },

    push(frame) {
      if (frame.event === "room.reopened" && frame.data && frame.data.room === ROOM) {
        roomClosed = false;
        setWritable(!stopped);
        hideBanner("closed");
        showStatus("This room is open again.");
      }
      // Server-side code talks to pages through these; let page scripts listen.
      document.dispatchEvent(new CustomEvent("chat:push", { detail: frame }));
    },

    pong() {},
  };

  // --- the message list ----------------------------------------------------

  function highestSeq() {
    let high = 0;
    for (const seq of shown.keys()) if (seq > high) high = seq;
    for (const seq of replySeqs) if (seq > high) high = seq;
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
    item.dataset.author = author;
    const meta = el("div", "meta");
    meta.append(el("span", "author", author));
    const time = el("time", "time", formatTime(createdAt));
    time.dateTime = createdAt;
    const date = new Date(createdAt);
    if (!Number.isNaN(date.getTime())) time.title = date.toLocaleString([], { dateStyle: "full", timeStyle: "short" });
    meta.append(time);
    const edited = el("span", "edited", "(edited)");
    edited.hidden = true;
    meta.append(edited);
    meta.append(el("span", "actions"));
    const text = el("div", "body");
    renderBody(text, body);
    item.append(meta, text, el("div", "attachments"), el("div", "reactions"), el("div", "thread-link"));
    if (author === ME) item.classList.add("own");
    return item;
  }

  // --- Markdown-lite: the body as DOM nodes, built with textContent only ------
  //
  // ```fenced``` code blocks, `code`, **bold**, *italic* or _italic_, bare
  // http(s) links, and @mentions. No HTML is ever parsed: every piece of the
  // body reaches the page as a text node or an element's textContent, and a
  // link's href is a URL the URL parser accepted with an http(s) scheme.

  const INLINE_RULES = [
    ["code", /`([^`\n]+)`/],
    ["link", /\bhttps?:\/\/[^\s<>"`]+/],
    ["strong", /\*\*(?=\S)([^\n]*?\S)\*\*/],
    ["em", /(?<![\w*])\*(?=[^\s*])([^\n*]*?[^\s*])\*(?![\w*])/],
    ["em", /(?<![\w])_(?=[^\s_])([^\n_]*?[^\s_])_(?![\w])/],
    ["mention", /(?<![\w.+-])@([\w.@+-]*\w)/],
  ];
  const INLINE_DEPTH_MAX = 3;

  function renderBody(node, body) {
    node.replaceChildren(...markdownBlocks(body));
    node.dir = "auto";
  }

  function markdownBlocks(body) {
    const parts = [];
    const lines = body.split("\n");
    let text = [];
    const flush = () => {
      if (text.length) parts.push(...markdownInline(text.join("\n"), 0));
      text = [];
    };
    for (let i = 0; i < lines.length; i += 1) {
      if (/^```[\w+-]*\s*$/.test(lines[i])) {
        const close = lines.findIndex((line, j) => j > i && /^```\s*$/.test(line));
        if (close !== -1) {
          flush();
          const pre = el("pre");
          pre.append(el("code", "", lines.slice(i + 1, close).join("\n")));
          parts.push(pre);
          i = close;
          continue;
        }
      }
      text.push(lines[i]);
    }
    flush();
    return parts;
  }

  function markdownInline(text, depth) {
    const parts = [];
    let rest = text;
    while (rest) {
      let best = null;
      for (const [kind, pattern] of INLINE_RULES) {
        if (depth >= INLINE_DEPTH_MAX && (kind === "strong" || kind === "em")) continue;
        const match = pattern.exec(rest);
        if (match && (best === null || match.index < best.match.index)) best = { kind, match };
      }
      if (best === null) {
        parts.push(document.createTextNode(rest));
        break;
      }
      const { kind, match } = best;
      let whole = match[0];
      if (match.index > 0) parts.push(document.createTextNode(rest.slice(0, match.index)));
      if (kind === "code") {
        parts.push(el("code", "", match[1]));
      } else if (kind === "link") {
        whole = trimLink(whole);
        parts.push(linkOrText(whole));
      } else if (kind === "mention") {
        const mention = el("span", "mention", whole);
        if (match[1] === ME) mention.classList.add("me");
        parts.push(mention);
      } else {
        const node = el(kind);
        node.append(...markdownInline(match[1], depth + 1));
        parts.push(node);
      }
      rest = rest.slice(match.index + whole.length);
    }
    return parts;
  }

  // A link ends before the punctuation after it ("see https://x.org.") and
  // before a ")" that closes a "(" of the sentence, not of the URL.
  function trimLink(url) {
    let end = url.length;
    const balance = (text) => text.split("(").length - text.split(")").length;
    for (;;) {
      const last = url[end - 1];
      if (".,;:!?'\"]".includes(last)) end -= 1;
      else if (last === ")" && balance(url.slice(0, end)) < 0) end -= 1;
      else break;
    }
    return url.slice(0, end);
  }

  function linkOrText(text) {
    let url;
    try {
      url = new URL(text);
    } catch {
      return document.createTextNode(text);
    }
    if (url.protocol !== "http:" && url.protocol !== "https:") return document.createTextNode(text);
    const link = el("a", "", text);
    link.href = url.href;
    link.target = "_blank";
    link.rel = "noopener noreferrer nofollow";
    return link;
  }

  // A message's elements: in the timeline, and in the open thread.
  function elementsOf(seq) {
    const found = [];
    if (shown.has(seq)) found.push(shown.get(seq));
    if (thread.shown.has(seq)) found.push(thread.shown.get(seq));
    if (thread.el && Number(thread.el.dataset.seq) === seq) found.push(thread.el);
    return found;
  }

  // Highlight a message that mentions me (not one of my own), or stop to.
  function markMentionOfMe(item, payload) {
    const mentionsMe = (payload.mentions || []).includes(ME) && payload.user.username !== ME;
    item.classList.toggle("mentions-me", mentionsMe);
    let note = item.querySelector(".mention-note");
    if (mentionsMe && !note) {
      note = el("span", "mention-note", "mentions you");
      item.querySelector(".meta").insertBefore(note, item.querySelector(".actions"));
    } else if (!mentionsMe && note) {
      note.remove();
    }
  }

  // Fill in what a message object brings: body, marks, attachments, reactions.
  function fillMessage(item, payload) {
    item.dataset.id = payload.id;
    item.dataset.seq = payload.seq;
    renderBody(item.querySelector(".body"), payload.body);
    item.querySelector(".edited").hidden = !payload.edited_at;
    markMentionOfMe(item, payload);
    if (payload.deleted) {
      markDeleted(item);
      return;
    }
    renderAttachments(item.querySelector(".attachments"), payload.attachments || []);
    renderReactions(item, payload);
    addReplyAction(item, payload);
    if (payload.user.username === ME) addOwnActions(item);
  }

  function rememberMessage(payload) {
    const known = messages.get(payload.id);
    // A reply_count we counted up live may be ahead of an older copy.
    if (known && (known.reply_count || 0) > (payload.reply_count || 0)) {
      payload.reply_count = known.reply_count;
    }
    messages.set(payload.id, payload);
  }

  function upsertMessage(payload) {
    rememberMessage(payload);
    if (payload.reply_to) {
      // Slack's way: a reply shows in its thread only; its parent counts it.
      replySeqs.add(payload.seq);
      if (thread.id === payload.reply_to) upsertThreadMessage(payload);
    } else {
      let item = shown.get(payload.seq);
      if (!item) {
        item = buildMessage(payload.user.username, payload.body, payload.created_at);
        item.id = `m${payload.seq}`;
        item.dataset.seq = payload.seq;
        watchTools(item);
        insertInOrder(item, payload.seq);
        shown.set(payload.seq, item);
      }
      fillMessage(item, payload);
      if (thread.id === payload.id) {
        if (thread.el) fillMessage(thread.el, payload);
        else showThreadRoot(payload); // it was further back than the timeline
      }
    }
    // Our own message seen through history or recovery settles its pending copy.
    const twin = pending.get(payload.client_msg_id);
    if (twin && payload.user.username === ME) {
      pending.delete(payload.client_msg_id);
      refs.delete(twin.ref);
      removeItem(twin.el);
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
    placeItem(item, before);
  }

  // --- reading: author blocks, days, the empty room, jump to latest ------------

  // Put `item` into the timeline before `before` (a message, or null for the
  // end), ahead of the day separator that belongs to `before`.
  function placeItem(item, before) {
    const separator = before?.previousElementSibling;
    if (separator && separator.classList.contains("day-separator")) before = separator;
    ui.messages.insertBefore(item, before);
    regroup(item);
    regroup(nextMessage(item));
    ui.empty.hidden = true;
  }

  function removeItem(item) {
    if (!item.isConnected) return;
    const next = nextMessage(item);
    const separator = item.previousElementSibling;
    if (separator && separator.classList.contains("day-separator")) separator.remove();
    item.remove();
    regroup(next);
    renderEmpty();
  }

  function nextMessage(item) {
    let next = item.nextElementSibling;
    while (next && !next.classList.contains("message")) next = next.nextElementSibling;
    return next;
  }

  function previousMessage(item) {
    let previous = item.previousElementSibling;
    while (previous && !previous.classList.contains("message")) previous = previous.previousElementSibling;
    return previous;
  }

  function dayKey(iso) {
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? "" : date.toDateString();
  }

  function dayLabel(iso) {
    const date = new Date(iso);
    const yesterday = new Date();
    yesterday.setDate(yesterday.getDate() - 1);
    if (date.toDateString() === new Date().toDateString()) return "Today";
    if (date.toDateString() === yesterday.toDateString()) return "Yesterday";
    return date.toLocaleDateString([], { weekday: "long", year: "numeric", month: "long", day: "numeric" });
  }

  // A message goes on its author's block (no name, no time shown) when it
  // follows their previous one within GROUP_WITHIN_MS on the same day; a new
  // day starts with a separator.
  function regroup(item) {
    if (!item || item.parentElement !== ui.messages) return;
    const previous = previousMessage(item);
    const at = item.querySelector(".meta time")?.dateTime || "";
    const previousAt = previous?.querySelector(".meta time")?.dateTime || "";
    const newDay = Boolean(at) && (!previous || dayKey(previousAt) !== dayKey(at));
    let separator = item.previousElementSibling;
    if (!separator || !separator.classList.contains("day-separator")) separator = null;
    if (newDay) {
      if (!separator) {
        separator = el("li", "day-separator");
        separator.setAttribute("role", "separator");
        ui.messages.insertBefore(separator, item);
      }
      separator.textContent = dayLabel(at);
    } else if (separator) {
      separator.remove();
    }
    const apart = new Date(at) - new Date(previousAt);
    const grouped =
      !newDay &&
      previous !== null &&
      previous.dataset.author === item.dataset.author &&
      apart >= 0 &&
      apart < GROUP_WITHIN_MS;
    item.classList.toggle("grouped", grouped);
  }

  function renderEmpty() {
    ui.empty.hidden = !snapshotLoaded || ui.messages.querySelector(".message") !== null;
  }

  let unseen = 0; // live messages that came while the reader was scrolled up

  function renderJump() {
    ui.jump.hidden = unseen === 0;
    ui.jump.textContent = unseen === 1 ? "1 new message ↓" : `${unseen} new messages ↓`;
  }

  function jumpToLatest() {
    timeline.scrollTop = timeline.scrollHeight;
    unseen = 0;
    renderJump();
  }

  ui.jump.addEventListener("click", () => {
    jumpToLatest();
    timeline.focus({ preventScroll: true });
  });

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
    const has = (seq) => shown.has(seq) || replySeqs.has(seq);
    while (low + 1 < before && has(low + 1)) low += 1;
    while (low + 1 < before && has(before - 1)) before -= 1;
    if (low + 1 >= before) return;
    const limit = Math.min(HISTORY_MAX, before - low - 1);
    const ref = nextRef("gap");
    gaps.set(ref, { low, before, limit }); // unsent (no socket): asked again on join
    send({ type: "history", room: ROOM, before, limit, ref });
  }

  function gapFilled(frame, gap) {
    const found = frame.messages.filter((m) => m.seq > gap.low && m.seq < gap.before);
    followBottom(() => {
      for (const payload of found) {
        if (!shown.has(payload.seq) && !replySeqs.has(payload.seq)) upsertMessage(payload);
      }
    });
    scheduleRead();
    // A short page reached below the gap: the seqs it lacks were removed for good.
    // A full one may have more under it; each page ends lower, so this ends.
    if (found.length === gap.limit) fillGap(gap.low, found[0].seq);
  }

  function markDeleted(item) {
    item.querySelector(".edit-box")?.remove();
    item.classList.remove("editing");
    item.classList.add("deleted");
    item.querySelector(".body").textContent = "message deleted";
    item.querySelector(".edited").hidden = true;
    item.querySelector(".actions").replaceChildren();
    item.querySelector(".attachments")?.replaceChildren();
    item.querySelector(".reactions")?.replaceChildren();
  }

  // --- attachments in messages -------------------------------------------------

  function humanSize(bytes) {
    if (bytes < 1024) return `${bytes} B`;
    const units = ["KB", "MB", "GB"];
    let value = bytes / 1024;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return `${value.toFixed(1)} ${units[unit]}`;
  }

  function renderAttachments(node, attachments) {
    node.replaceChildren(
      ...attachments.map((file) => {
        const link = el("a", "attachment");
        link.href = file.url;
        link.target = "_blank";
        link.rel = "noopener";
        if (IMAGE_TYPES.has(file.content_type)) {
          link.classList.add("image");
          const img = el("img");
          img.src = file.url;
          img.alt = file.name;
          img.loading = "lazy";
          link.append(img);
        } else {
          link.textContent = `${file.name} · ${humanSize(file.size)}`;
        }
        return link;
      }),
    );
  }

  // --- reactions ---------------------------------------------------------------

  function renderReactions(item, payload) {
    const box = item.querySelector(".reactions");
    if (!box) return;
    const buttons = (payload.reactions || [])
      .filter((r) => r.count > 0)
      .map((r) => {
        const mine = r.users.includes(ME);
        const button = el("button", "reaction", `${r.emoji} ${r.count}`);
        button.type = "button";
        button.dataset.emoji = r.emoji;
        const label = `${r.emoji} ${r.count}: ${r.users.join(", ")}`;
        button.title = label;
        button.setAttribute("aria-label", label);
        button.setAttribute("aria-pressed", mine ? "true" : "false");
        button.addEventListener("click", () => react(item, r.emoji, !mine));
        return button;
      });
    // A reaction arriving while a button here has focus (the opener just
    // used, or a count toggled by keyboard) must not drop focus to <body>:
    // the buttons are rebuilt, so focus goes to the one that stands for it.
    const focused = box.contains(document.activeElement) ? document.activeElement : null;
    const opener = box.querySelector(".react-open");
    box.replaceChildren(...buttons, ...(opener ? [opener] : []));
    renderTools(item);
    if (focused) {
      const again = focused.classList.contains("react-open")
        ? box.querySelector(".react-open")
        : [...box.querySelectorAll(".reaction")].find((b) => b.dataset.emoji === focused.dataset.emoji);
      (again || box.querySelector(".react-open"))?.focus();
    }
  }

  // Slack's hover toolbar: Reply and React come to a message when it is first
  // pointed at or focused (each message is a tab stop), not to every message
  // at once, so a long timeline holds two buttons per message only where used.
  function watchTools(item) {
    item.tabIndex = 0;
    const add = () => {
      if (item.classList.contains("pending") || item.classList.contains("failed")) return;
      item.dataset.tools = "1";
      renderTools(item);
    };
    item.addEventListener("mouseenter", add);
    item.addEventListener("focusin", add);
  }

  function renderTools(item) {
    if (!item.dataset.tools || item.classList.contains("deleted") || !item.dataset.id) return;
    const actions = item.querySelector(".actions");
    const replies = !item.classList.contains("reply") && !item.classList.contains("thread-root");
    if (replies && !actions.querySelector(".reply-open")) {
      const reply = el("button", "reply-open", "Reply");
      reply.type = "button";
      reply.addEventListener("click", () => openThread(Number(item.dataset.id)));
      actions.prepend(reply);
    }
    const box = item.querySelector(".reactions");
    if (box && !box.querySelector(".react-open")) {
      const picker = el("button", "react-open", "React");
      picker.type = "button";
      picker.setAttribute("aria-haspopup", "true");
      picker.setAttribute("aria-expanded", "false");
      picker.addEventListener("click", () => togglePicker(item, picker));
      box.append(picker);
    }
  }

  function togglePicker(item, opener) {
    const open = item.querySelector(".emoji-picker");
    if (open) {
      open.remove();
      opener.setAttribute("aria-expanded", "false");
      return;
    }
    const picker = el("div", "emoji-picker");
    picker.setAttribute("role", "group");
    picker.setAttribute("aria-label", "Pick a reaction");
    for (const emoji of EMOJI) {
      const choice = el("button", "emoji", emoji);
      choice.type = "button";
      choice.setAttribute("aria-label", `React ${emoji}`);
      choice.addEventListener("click", () => {
        picker.remove();
        opener.setAttribute("aria-expanded", "false");
        react(item, emoji, true);
        opener.focus();
      });
      picker.append(choice);
    }
    picker.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        event.stopPropagation();
        picker.remove();
        opener.setAttribute("aria-expanded", "false");
        opener.focus();
      }
    });
    opener.setAttribute("aria-expanded", "true");
    item.querySelector(".reactions").after(picker);
    picker.querySelector("button").focus();
  }

  function react(item, emoji, on) {
    const frame = { type: "react", room: ROOM, id: Number(item.dataset.id), emoji, on, ref: nextRef("react") };
    if (!joined || !send(frame)) showStatus("Not connected: try again in a moment.");
  }

  // --- replies and the thread panel -------------------------------------------

  function addReplyAction(item, payload) {
    const link = item.querySelector(".thread-link");
    if (!link || item.classList.contains("reply")) return;
    const count = payload.reply_count || 0;
    if (count > 0) {
      const open = el("button", "replies", count === 1 ? "1 reply" : `${count} replies`);
      open.type = "button";
      open.addEventListener("click", () => openThread(Number(item.dataset.id)));
      link.replaceChildren(open);
    } else {
      link.replaceChildren();
    }
  }

  function bumpReplies(parentId) {
    const parent = messages.get(parentId);
    if (!parent) return;
    parent.reply_count = (parent.reply_count || 0) + 1;
    for (const item of elementsOf(parent.seq)) addReplyAction(item, parent);
  }

  // Open the thread of message `id`; with `target`, the seq of one of its
  // replies to show highlighted (a jump), whose parent the page may not have.
  function openThread(id, target = null) {
    const parent = messages.get(id);
    if (!parent && target === null) return;
    thread.id = id;
    thread.target = target;
    thread.shown.clear();
    thread.hasMore = false;
    showThreadRoot(parent);
    ui.threadMessages.replaceChildren();
    ui.threadOlder.hidden = true;
    ui.thread.hidden = false;
    document.body.classList.add("thread-open");
    askThread(null);
    if (target === null) ui.threadInput.focus();
  }

  // The message the open thread answers, or a note while the page lacks it.
  function showThreadRoot(parent) {
    if (!parent) {
      thread.el = null;
      ui.threadParent.replaceChildren(
        el("p", "thread-parent-missing", "The message this thread answers is further back in the room."),
      );
      return;
    }
    const item = buildMessage(parent.user.username, parent.body, parent.created_at);
    item.classList.add("thread-root");
    watchTools(item);
    fillMessage(item, parent);
    item.querySelector(".thread-link").remove();
    thread.el = item;
    ui.threadParent.replaceChildren(item);
  }

  function closeThread() {
    if (thread.id === null) return;
    const id = thread.id;
    thread.id = null;
    thread.el = null;
    thread.shown.clear();
    ui.thread.hidden = true;
    document.body.classList.remove("thread-open");
    const parent = messages.get(id);
    const item = parent && shown.get(parent.seq);
    (item?.querySelector(".replies") || item?.querySelector(".reply-open") || ui.input).focus();
  }

  function askThread(before) {
    const frame = { type: "history", room: ROOM, thread: thread.id, limit: HISTORY_PAGE, ref: nextRef("thread") };
    if (before !== null) frame.before = before;
    thread.ref = frame.ref;
    if (send(frame)) ui.threadOlder.disabled = true;
  }

  function threadPage(frame) {
    if (frame.thread !== thread.id) return;
    for (const payload of frame.messages) {
      rememberMessage(payload);
      replySeqs.add(payload.seq);
      upsertThreadMessage(payload);
    }
    thread.hasMore = frame.has_more;
    ui.threadOlder.hidden = !frame.has_more;
    ui.threadOlder.disabled = false;
    if (thread.target !== null) showThreadTarget();
  }

  // A jump to a reply: page back through its thread until the reply shows.
  function showThreadTarget() {
    const item = thread.shown.get(thread.target);
    const lowest = Math.min(...thread.shown.keys());
    if (item) {
      thread.target = null;
      highlight(item);
    } else if (thread.hasMore && lowest > thread.target) {
      askThread(lowest);
    } else {
      thread.target = null; // not in this thread any more
    }
  }

  function upsertThreadMessage(payload) {
    let item = thread.shown.get(payload.seq);
    if (!item) {
      item = buildMessage(payload.user.username, payload.body, payload.created_at);
      item.classList.add("reply");
      item.querySelector(".thread-link").remove();
      watchTools(item);
      let before = null;
      for (const [seq, child] of thread.shown) {
        if (seq > payload.seq && (!before || seq < Number(before.dataset.seq))) before = child;
      }
      ui.threadMessages.insertBefore(item, before);
      thread.shown.set(payload.seq, item);
    }
    fillMessage(item, payload);
  }

  ui.threadOlder.addEventListener("click", () => {
    const seqsShown = [...thread.shown.keys()];
    askThread(seqsShown.length ? Math.min(...seqsShown) : null);
  });
  ui.threadClose.addEventListener("click", closeThread);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && thread.id !== null && !event.defaultPrevented) closeThread();
  });

  // --- jumping to a message (#m<seq>) ------------------------------------------

  let jumpAfter = null; // the jump's first page ends here: newer ones come after

  function hashSeq() {
    const match = /^#m(\d{1,15})$/.exec(location.hash);
    return match && Number(match[1]) > 0 ? Number(match[1]) : null;
  }

  // Show message `seq` highlighted: in the timeline, or a reply in its thread
  // (every message object names the message it replies to). Answers whether
  // the page has it.
  function jumpTo(seq) {
    const item = shown.get(seq) || thread.shown.get(seq);
    if (item) {
      highlight(item);
      return true;
    }
    const reply = replySeqs.has(seq) ? [...messages.values()].find((m) => m.seq === seq) : null;
    if (!reply || !reply.reply_to) return false;
    openThread(reply.reply_to, seq);
    return true;
  }

  function highlight(item) {
    item.scrollIntoView({ block: "center" });
    item.classList.add("highlight");
    setTimeout(() => item.classList.remove("highlight"), 4000);
  }

  // A link to #m<seq> once the page is up (a search result or a notification in
  // this room). A message the page does not have: the page loads around it, as
  // for a link from elsewhere.
  window.addEventListener("hashchange", () => {
    const seq = hashSeq();
    if (seq === null) return;
    if (!snapshotLoaded) jumpSeq = seq;
    else if (!jumpTo(seq)) location.reload();
  });
  // The same link again (the hash does not change, so no hashchange).
  document.addEventListener("click", (event) => {
    const link = event.target instanceof Element ? event.target.closest("a[href]") : null;
    if (link && link.href === location.href && hashSeq() !== null) jumpTo(hashSeq());
  });

  function addOwnActions(item) {
    const actions = item.querySelector(".actions");
    if (actions.querySelector(".edit")) return;
    const edit = el("button", "edit", "Edit");
    edit.type = "button";
    edit.addEventListener("click", () => editMessage(item));
    const remove = el("button", "delete", "Delete");
    remove.type = "button";
    remove.addEventListener("click", () => deleteMessage(item));
    actions.append(edit, remove);
  }

  // Editing in place: the body becomes a box; Enter saves, Escape cancels,
  // and the focus goes back where it came from.
  function editMessage(item, returnFocus = null) {
    const open = item.querySelector(".edit-box textarea");
    if (open) {
      open.focus();
      return;
    }
    const known = messages.get(Number(item.dataset.id));
    const current = known ? known.body : item.querySelector(".body").textContent;
    const box = el("div", "edit-box");
    const area = el("textarea", "edit-input");
    area.value = current;
    area.rows = Math.min(8, current.split("\n").length + 1);
    area.setAttribute("aria-label", "Edit your message");
    const save = el("button", "primary edit-save", "Save");
    save.type = "button";
    const cancel = el("button", "edit-cancel", "Cancel");
    cancel.type = "button";
    const row = el("div", "edit-actions");
    row.append(save, cancel, el("span", "edit-hint", "Enter saves · Escape cancels"));
    box.append(area, row);
    item.querySelector(".body").after(box);
    item.classList.add("editing");
    const back = returnFocus || item.querySelector(".edit");
    const close = () => {
      box.remove();
      item.classList.remove("editing");
      (back && back.isConnected ? back : ui.input).focus();
    };
    const commit = () => {
      const body = area.value.replace(/\s+$/, "");
      if (!body.trim() || body === current) {
        close();
        return;
      }
      if (textLength(body) > MAX_BODY) {
        showStatus(`A message has at most ${MAX_BODY} characters: this has ${textLength(body)}.`);
        return;
      }
      const frame = { type: "edit", room: ROOM, id: Number(item.dataset.id), body, ref: nextRef("edit") };
      if (!joined || !send(frame)) {
        showStatus("Not connected: try again in a moment.");
        return;
      }
      close();
    };
    save.addEventListener("click", commit);
    cancel.addEventListener("click", close);
    area.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        event.preventDefault();
        event.stopPropagation();
        close();
      } else if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        commit();
      }
    });
    area.focus();
    area.setSelectionRange(area.value.length, area.value.length);
  }

  // An accessible confirm: a modal <dialog>, Cancel focused, Escape cancels.
  function confirmed(text, okLabel) {
    return new Promise((resolve) => {
      ui.confirmText.textContent = text;
      ui.confirmOk.textContent = okLabel;
      ui.confirm.returnValue = "";
      ui.confirm.addEventListener("close", () => resolve(ui.confirm.returnValue === "ok"), { once: true });
      ui.confirm.showModal();
      $("confirm-cancel").focus();
    });
  }

  async function deleteMessage(item) {
    const opener = document.activeElement;
    const yes = await confirmed("Delete this message for everyone?", "Delete");
    if (!yes) {
      if (opener && opener.isConnected) opener.focus();
      return;
    }
    const frame = { type: "delete", room: ROOM, id: Number(item.dataset.id), ref: nextRef("delete") };
    if (!joined || !send(frame)) showStatus("Not connected: try again in a moment.");
    ui.input.focus();
  }

  // Up-arrow in an empty composer edits my last message.
  function editLast() {
    const own = ui.messages.querySelectorAll(".message.own[data-id]:not(.deleted):not(.pending)");
    const last = own[own.length - 1];
    if (!last) return false;
    last.scrollIntoView({ block: "nearest" });
    editMessage(last, ui.input);
    return true;
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

  function loadOlder() {
    if (!hasMore || ui.older.disabled || !snapshotLoaded) return;
    const shownFrom = lowestSeq();
    const before = pagedFrom === null || (shownFrom !== null && shownFrom < pagedFrom) ? shownFrom : pagedFrom;
    const frame = { type: "history", room: ROOM, limit: HISTORY_PAGE, ref: nextRef("history") };
    if (before !== null) frame.before = before;
    if (send(frame)) ui.older.disabled = true;
  }

  ui.older.addEventListener("click", loadOlder);
  // History loads as the reader scrolls up; the place they read stays put.
  timeline.addEventListener(
    "scroll",
    () => {
      if (timeline.scrollTop < OLDER_WHEN_PX) loadOlder();
      if (unseen && nearBottom()) {
        unseen = 0;
        renderJump();
      }
    },
    { passive: true },
  );

  // Screen readers hear new messages from others and state changes, once.
  function announce(text) {
    ui.announce.textContent = "";
    ui.announce.textContent = text;
  }

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
    const frame = { type: "send", room: ROOM, body: item.body, client_msg_id: clientMsgId, ref: item.ref };
    if (item.replyTo) frame.reply_to = item.replyTo;
    if (item.attachments.length) frame.attachments = item.attachments.map((file) => file.id);
    send(frame);
  }

  function sendFailed(clientMsgId, frame) {
    const item = pending.get(clientMsgId);
    if (!item) return;
    if (frame.code === "rate_limited") {
      setTimeout(() => transmit(clientMsgId), (frame.retry_after || 1) * 1000);
      return;
    }
    if (frame.code === "muted") showBanner("muted", muteText(frame.message));
    if (frame.code === "room_closed") {
      roomClosed = true;
      setWritable(false);
      showBanner("closed", "This room is closed: you can read it, but it takes no new messages.");
    }
    pending.delete(clientMsgId);
    markFailed(item, frame.message);
  }

  // "you are muted in 'lobby' until <ISO time>: <reason>", said for people.
  function muteText(message) {
    const found = /^you are muted in '[^']*'(?: until (\S+?))?: ([\s\S]*)$/.exec(message);
    if (!found) return `You are muted: ${message}`;
    const [, until, reason] = found;
    return `You are muted in this room${untilText(until)}: ${reason}`;
  }

  function markFailed(item, why) {
    item.el.classList.remove("pending");
    item.el.classList.add("failed");
    const actions = item.el.querySelector(".actions");
    actions.replaceChildren(el("span", "failure", why.startsWith("not sent") ? why : `not sent: ${why}`));
    const discard = el("button", "discard", "Discard");
    discard.type = "button";
    discard.addEventListener("click", () => {
      removeItem(item.el);
      ui.input.focus();
    });
    actions.append(discard);
  }

  // The main composer sends to the timeline with the attached files; the
  // thread's composer sends a reply (with reply_to) and no files.
  function submit(input = ui.input, replyTo = null) {
    if (!writable) return;
    // Leading spaces are the writer's (indented code); trailing ones go.
    let body = input.value.replace(/\s+$/, "");
    if (!body.trim()) body = "";
    const files = replyTo ? [] : attached.filter((file) => file.id !== undefined);
    if (!replyTo && attached.some((file) => file.id === undefined)) {
      showStatus("Wait for the files to finish uploading.");
      return;
    }
    // The server wants a body of 1+ characters: a message of files only is
    // sent with their names as its body.
    if (!body && files.length) body = files.map((file) => file.name).join(", ");
    if (!body) return;
    if (textLength(body) > MAX_BODY) {
      // Refused whole, never cut: the text stays in the box to shorten.
      showStatus(`A message has at most ${MAX_BODY} characters: this has ${textLength(body)}.`, 0);
      updateCount();
      return;
    }
    const clientMsgId = newClientMsgId();
    const item = buildMessage(ME, body, new Date().toISOString());
    item.classList.add("pending");
    item.dataset.clientMsgId = clientMsgId;
    item.querySelector(".actions").append(el("span", "sending", "sending…"));
    if (replyTo) {
      item.classList.add("reply");
      ui.threadMessages.append(item);
    } else {
      placeItem(item, null);
      jumpToLatest();
    }
    pending.set(clientMsgId, { body, ref: null, el: item, replyTo, attachments: files });
    input.value = "";
    updateCount();
    closeMentions();
    if (!replyTo) {
      attached = [];
      renderChips();
    }
    lastTypingAt = 0;
    transmit(clientMsgId); // not joined yet: sent on (re)join
  }

  let writable = true; // false: closed room, banned, removed, stopped

  function setWritable(on) {
    writable = on;
    for (const control of [ui.input, ui.attach, ui.threadInput]) control.disabled = !on;
    ui.threadForm.querySelector("button[type=submit]").disabled = !on;
    updateCount();
  }

  // What waited to be sent when the page stopped: shown as not sent (the
  // server never acknowledged it), its text still on screen.
  function failPending(why) {
    for (const item of pending.values()) markFailed(item, why);
    pending.clear();
    refs.clear();
  }

  // Characters as the server counts them (code points, not UTF-16 units).
  function textLength(text) {
    let count = 0;
    for (const _ of text) count += 1;
    return count;
  }

  // Near the limit, a counter; past it, the Send button waits.
  function updateCount() {
    const count = textLength(ui.input.value.replace(/\s+$/, ""));
    const over = count > MAX_BODY;
    ui.count.hidden = count < COUNT_FROM;
    ui.count.textContent = over
      ? `${count} / ${MAX_BODY} characters: ${count - MAX_BODY} too many`
      : `${count} / ${MAX_BODY} characters`;
    ui.count.classList.toggle("over", over);
    ui.input.setAttribute("aria-invalid", over ? "true" : "false");
    ui.send.disabled = !writable || over;
  }

  ui.input.addEventListener("input", updateCount);

  ui.form.addEventListener("submit", (event) => {
    event.preventDefault();
    submit();
  });
  ui.threadForm.addEventListener("submit", (event) => {
    event.preventDefault();
    if (thread.id !== null) submit(ui.threadInput, thread.id);
  });

  for (const [input, replying] of [
    [ui.input, false],
    [ui.threadInput, true],
  ]) {
    input.addEventListener("keydown", (event) => {
      if (mentionKey(event, input)) return;
      if (!replying && event.key === "ArrowUp" && !input.value && !event.shiftKey && !event.isComposing) {
        if (editLast()) event.preventDefault();
        return;
      }
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        if (!replying) submit();
        else if (thread.id !== null) submit(ui.threadInput, thread.id);
      }
    });
    input.addEventListener("input", () => updateMentions(input));
    input.addEventListener("blur", () => setTimeout(closeMentions, 150));
  }

  // --- attaching files ---------------------------------------------------------

  let attached = []; // {key, name, size, id?}: id once uploaded
  let attachKey = 0;

  function csrfToken() {
    const found = document.cookie.split("; ").find((part) => part.startsWith("csrftoken="));
    return found ? decodeURIComponent(found.slice("csrftoken=".length)) : "";
  }

  function renderChips() {
    ui.chips.replaceChildren(
      ...attached.map((file) => {
        const chip = el("li", "chip");
        chip.append(el("span", "chip-name", file.name), el("span", "chip-size", humanSize(file.size)));
        if (file.id === undefined) chip.append(el("span", "chip-state", "uploading…"));
        const remove = el("button", "chip-remove", "×");
        remove.type = "button";
        remove.setAttribute("aria-label", `Remove ${file.name}`);
        remove.addEventListener("click", () => {
          attached = attached.filter((other) => other.key !== file.key);
          renderChips();
        });
        chip.append(remove);
        return chip;
      }),
    );
    ui.chips.hidden = attached.length === 0;
  }

  async function upload(file) {
    attachKey += 1;
    const entry = { key: attachKey, name: file.name, size: file.size };
    attached.push(entry);
    renderChips();
    const body = new FormData();
    body.append("file", file);
    let response = null;
    try {
      response = await fetch("/api/uploads", {
        method: "POST",
        body,
        headers: { "X-CSRFToken": csrfToken() },
        credentials: "same-origin",
      });
    } catch {
      response = null;
    }
    if (response && response.status === 201) {
      const data = await response.json();
      Object.assign(entry, { id: data.id, name: data.name, size: data.size });
    } else {
      attached = attached.filter((other) => other.key !== entry.key);
      if (response && response.status === 413) {
        showStatus(`${file.name} is too large to upload.`, 0);
      } else {
        showStatus(`${file.name} could not be uploaded${response ? ` (${response.status})` : ""}.`, 0);
      }
    }
    renderChips();
  }

  function attachFiles(files) {
    for (const file of files) upload(file);
  }

  ui.attach.addEventListener("click", () => ui.file.click());
  ui.file.addEventListener("change", () => {
    attachFiles([...ui.file.files]);
    ui.file.value = "";
  });
  ui.input.addEventListener("paste", (event) => {
    const files = [...(event.clipboardData?.files || [])];
    if (!files.length) return;
    event.preventDefault();
    attachFiles(files);
  });
  ui.form.addEventListener("dragover", (event) => {
    if (event.dataTransfer?.types?.includes("Files")) {
      event.preventDefault();
      ui.form.classList.add("dropping");
    }
  });
  ui.form.addEventListener("dragleave", () => ui.form.classList.remove("dropping"));
  ui.form.addEventListener("drop", (event) => {
    ui.form.classList.remove("dropping");
    const files = [...(event.dataTransfer?.files || [])];
    if (!files.length) return;
    event.preventDefault();
    attachFiles(files);
  });

  // --- @mention autocomplete -----------------------------------------------------

  let members = null; // the room's members, fetched on the first "@"
  let membersAsked = false;
  const mention = { input: null, start: 0, items: [], active: 0 };

  async function loadMembers() {
    if (membersAsked) return;
    membersAsked = true;
    try {
      const response = await fetch(`/api/rooms/${encodeURIComponent(ROOM)}/members`, {
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
      if (response.ok) members = (await response.json()).members;
    } catch {
      // keep what we had
    }
    if (members === null) membersAsked = false; // ask again on the next "@"
    renderMembers();
    if (mention.input) updateMentions(mention.input);
  }

  function updateMentions(input) {
    const upto = input.value.slice(0, input.selectionStart);
    const match = /(^|[^\w.+-])@([\w.+-]*)$/.exec(upto);
    if (!match) {
      closeMentions();
      return;
    }
    mention.input = input;
    mention.start = upto.length - match[2].length; // after the "@"
    if (!membersAsked) loadMembers(); // once per page: the list may have grown
    if (members === null) return;
    const prefix = match[2].toLowerCase();
    mention.items = members.filter((name) => name !== ME && name.toLowerCase().startsWith(prefix)).slice(0, 8);
    mention.active = 0;
    renderMentions();
  }

  function renderMentions() {
    if (!mention.items.length) {
      closeMentions();
      return;
    }
    ui.mentionList.replaceChildren(
      ...mention.items.map((name, index) => {
        const option = el("li", "mention-option", name);
        option.id = `mention-option-${index}`;
        option.setAttribute("role", "option");
        option.setAttribute("aria-selected", index === mention.active ? "true" : "false");
        option.addEventListener("mousedown", (event) => {
          event.preventDefault(); // keep the focus in the composer
          pickMention(name);
        });
        return option;
      }),
    );
    // Shown under the composer it belongs to.
    const form = mention.input === ui.threadInput ? ui.threadForm : ui.form;
    if (ui.mentionList.parentElement !== form.parentElement || ui.mentionList.nextElementSibling !== form) {
      form.before(ui.mentionList);
    }
    ui.mentionList.hidden = false;
    mention.input.setAttribute("aria-expanded", "true");
    mention.input.setAttribute("aria-activedescendant", `mention-option-${mention.active}`);
  }

  function closeMentions() {
    if (mention.input) {
      mention.input.setAttribute("aria-expanded", "false");
      mention.input.removeAttribute("aria-activedescendant");
    }
    mention.items = [];
    ui.mentionList.hidden = true;
    ui.mentionList.replaceChildren();
  }

  function pickMention(name) {
    const input = mention.input;
    const value = input.value;
    const end = input.selectionStart;
    const text = `${name} `;
    input.value = value.slice(0, mention.start) + text + value.slice(end);
    const caret = mention.start + text.length;
    input.setSelectionRange(caret, caret);
    closeMentions();
    input.focus();
  }

  // Keys while the list is open; true when the key was the list's.
  function mentionKey(event, input) {
    if (ui.mentionList.hidden || mention.input !== input || !mention.items.length) return false;
    if (event.key === "ArrowDown" || event.key === "ArrowUp") {
      const step = event.key === "ArrowDown" ? 1 : -1;
      mention.active = (mention.active + step + mention.items.length) % mention.items.length;
      renderMentions();
    } else if (event.key === "Enter" || event.key === "Tab") {
      pickMention(mention.items[mention.active]);
    } else if (event.key === "Escape") {
      closeMentions();
    } else {
      return false;
    }
    event.preventDefault();
    event.stopPropagation();
    return true;
  }

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
    ui.peopleToggleCount.textContent = onlineCount === null ? "" : String(onlineCount);
    renderMembers();
  }

  // --- people: members with who is online, invite, leave -----------------------

  let canInvite = false;
  let peopleTimer = null;

  let peopleAskedAt = 0;
  const PEOPLE_EVERY_MS = 10000;

  // Someone not on the members list came online: they may have just joined.
  // At most one fetch per PEOPLE_EVERY_MS, however busy the room.
  function refreshPeople() {
    if (peopleTimer !== null) return;
    const wait = Math.max(1000, peopleAskedAt + PEOPLE_EVERY_MS - Date.now());
    peopleTimer = setTimeout(() => {
      peopleTimer = null;
      loadPeople();
    }, wait);
  }

  async function loadPeople() {
    peopleAskedAt = Date.now();
    try {
      const response = await fetch(`/api/rooms/${encodeURIComponent(ROOM)}/members`, {
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
      if (!response.ok) return;
      const data = await response.json();
      members = data.members;
      canInvite = Boolean(data.can_invite);
    } catch {
      return;
    }
    renderMembers();
    ui.inviteForm.hidden = !canInvite;
    ui.leave.hidden = !config.can_leave;
  }

  function renderMembers() {
    if (members === null) return;
    ui.membersSection.hidden = members.length === 0;
    ui.membersCount.textContent = String(members.length);
    ui.members.replaceChildren(
      ...members.map((name) => {
        const here = online.has(name);
        const item = el("li", here ? "online" : "", name);
        item.dataset.user = name;
        item.title = here ? `${name}: online` : `${name}: away`;
        return item;
      }),
    );
  }

  function setInviteStatus(text, error) {
    ui.inviteStatus.textContent = text;
    ui.inviteStatus.classList.toggle("error", error);
  }

  async function postJson(url, data) {
    const response = await fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", Accept: "application/json", "X-CSRFToken": csrfToken() },
      body: JSON.stringify(data),
    });
    let body = {};
    try {
      body = await response.json();
    } catch {
      body = {};
    }
    return { status: response.status, body };
  }

  ui.inviteForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const username = ui.inviteInput.value.trim().replace(/^@/, "");
    if (!username) return;
    let answer;
    try {
      answer = await postJson(`/api/rooms/${encodeURIComponent(ROOM)}/members`, { username });
    } catch {
      setInviteStatus("Could not reach the server: try again.", true);
      return;
    }
    if (answer.status === 201 || answer.status === 200) {
      const name = answer.body.member || username;
      setInviteStatus(answer.status === 201 ? `${name} is now a member.` : `${name} is already a member.`, false);
      ui.inviteInput.value = "";
      if (members && !members.includes(name)) {
        members.push(name);
        members.sort((a, b) => a.localeCompare(b));
      }
      renderMembers();
    } else {
      setInviteStatus(answer.body.error || `Could not invite (${answer.status}).`, true);
    }
  });

  ui.leave.addEventListener("click", async () => {
    const yes = await confirmed(
      config.is_private ? "Leave this room? You need an invitation to come back." : "Leave this room?",
      "Leave",
    );
    if (!yes) {
      ui.leave.focus();
      return;
    }
    let answer;
    try {
      answer = await postJson(`/api/rooms/${encodeURIComponent(ROOM)}/leave`, {});
    } catch {
      showStatus("Could not reach the server: try again.");
      return;
    }
    if (answer.status === 200) {
      stopped = true;
      socket?.close(1000);
      location.assign("/");
    } else {
      showStatus(answer.body.error || `Could not leave (${answer.status}).`);
    }
  });

  // Phones: the people panel folds behind a button in the room's header.
  ui.peopleToggle.addEventListener("click", () => {
    const open = !ui.people.classList.contains("open");
    ui.people.classList.toggle("open", open);
    ui.peopleToggle.setAttribute("aria-expanded", String(open));
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && ui.people.classList.contains("open")) {
      ui.people.classList.remove("open");
      ui.peopleToggle.setAttribute("aria-expanded", "false");
      ui.peopleToggle.focus();
    }
  });

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

  ui.input.focus({ preventScroll: true });
  connect();
})();
