// The room page's sidebar: the user's rooms with unread and mention badges.
// It reads the frames chat.js receives (the chat:frame event) and sends on its
// socket through window.chatsite (chat.js).
(() => {
  "use strict";
})();
