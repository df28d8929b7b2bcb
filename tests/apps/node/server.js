// A Node socket.io worker for corral's tests. PORT and WORKER name it; it accepts
// Engine.IO v3 clients too (allowEIO3), so corral's EIO=3 handshake parsing is
// exercised against a real server.
const http = require('http');
const { Server } = require('socket.io');

const port = Number(process.env.PORT);
const worker = process.env.WORKER || `node${process.env.CORRAL_WORKER_ID ?? port}`;
const httpServer = http.createServer((req, res) => {
  if (req.url === '/health') { res.end('ok'); return; }
  if (req.url === '/whoami') { res.end(JSON.stringify({ worker })); return; }
  res.statusCode = 404; res.end();
});
const io = new Server(httpServer, { allowEIO3: true, cors: { origin: true } });

// With a message queue (corral's embedded broker or Redis), broadcasts cross processes.
async function useQueue(url) {
  const { createClient } = require('redis');
  const { createAdapter } = require('@socket.io/redis-adapter');
  const pub = createClient({ url });
  const sub = pub.duplicate();
  for (const c of [pub, sub]) c.on('error', (e) => console.error('redis error', e.message));
  await Promise.all([pub.connect(), sub.connect()]);
  io.adapter(createAdapter(pub, sub));
  console.log(`worker ${worker}: message queue ${url}`);
}
io.on('connection', (socket) => {
  socket.join('all');
  socket.emit('welcome', { worker, sid: socket.id });
  socket.on('broadcast', (data) => io.to('all').emit('message', data));
});
const queue = process.env.CORRAL_MESSAGE_QUEUE;
(queue ? useQueue(queue) : Promise.resolve()).then(() => {
  httpServer.listen(port, '127.0.0.1', () => console.log(`node worker ${worker} on ${port}`));
});
