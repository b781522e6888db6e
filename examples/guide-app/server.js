// The app of docs/app-guide.md on socketcluster-server 20 (node server.js; npm install first):
// login, a chat room with its history, who is in the room, and the history over HTTP (express).
// src/main.rs is the same app on sc-rs; count-lines.sh compares them.
const http = require('http');
const express = require('express');
const socketClusterServer = require('socketcluster-server');

const ROOM = 'chat/lobby';
const KEEP = Number(process.env.HISTORY || 50);
// agServer.exchange is pub/sub only in SocketCluster 20: no key/value store, so the history and
// the presence live in this process (several processes would need Redis or similar for both).
const history = [];
const present = new Map();

const httpServer = http.createServer();
const agServer = socketClusterServer.attach(httpServer);
const app = express();
app.get('/api/history', (req, res) => res.json(history));
httpServer.on('request', app);

function loginRequired() {
  const error = new Error('log in first');
  error.name = 'LoginRequired';
  return error;
}

agServer.setMiddleware(agServer.MIDDLEWARE_INBOUND, async (middlewareStream) => {
  for await (const action of middlewareStream) {
    if (action.type === action.SUBSCRIBE && !action.socket.authToken) {
      action.block(loginRequired());
      continue;
    }
    action.allow();
  }
});

(async () => {
  for await (const { socket } of agServer.listener('connection')) {
    (async () => {
      for await (const req of socket.procedure('login')) {
        if (!req.data || !req.data.username) {
          const error = new Error('a name is required');
          error.name = 'LoginError';
          req.error(error);
          continue;
        }
        socket.setAuthToken({ username: req.data.username });
        req.end();
      }
    })();
    (async () => {
      for await (const req of socket.procedure('say')) {
        if (!socket.authToken) {
          req.error(loginRequired());
          continue;
        }
        const message = { from: socket.authToken.username, text: req.data.text };
        history.push(message);
        if (history.length > KEEP) history.shift();
        await agServer.exchange.invokePublish(ROOM, message);
        req.end();
      }
    })();
    (async () => {
      for await (const req of socket.procedure('history')) req.end(history);
    })();
    (async () => {
      for await (const req of socket.procedure('who')) {
        const members = [...present].map(([id, user]) => ({ id, user }));
        req.end({ channel: ROOM, count: members.length, members });
      }
    })();
    (async () => {
      for await (const { channel } of socket.listener('subscribe')) {
        if (channel === ROOM) present.set(socket.id, socket.authToken.username);
      }
    })();
    (async () => {
      for await (const { channel } of socket.listener('unsubscribe')) {
        if (channel === ROOM) present.delete(socket.id);
      }
    })();
    (async () => {
      await socket.listener('close').once();
      present.delete(socket.id);
    })();
  }
})();

httpServer.listen(Number(process.env.PORT || 8000));
