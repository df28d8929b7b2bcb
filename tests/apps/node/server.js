// A Node socket.io worker for corral's tests. PORT and WORKER name it; it accepts
// Engine.IO v3 clients too (allowEIO3), so corral's EIO=3 handshake parsing is
// exercised against a real server.
const http = require('http');
const { Server } = require('socket.io');

const port = Number(process.env.PORT);
const worker = process.env.WORKER || `node${port}`;
const httpServer = http.createServer((req, res) => {
  if (req.url === '/health') { res.end('ok'); return; }
  if (req.url === '/whoami') { res.end(JSON.stringify({ worker })); return; }
  res.statusCode = 404; res.end();
});
const io = new Server(httpServer, { allowEIO3: true, cors: { origin: true } });
io.on('connection', (socket) => {
  socket.join('all');
  socket.emit('welcome', { worker, sid: socket.id });
  socket.on('broadcast', (data) => io.to('all').emit('message', data));
});
httpServer.listen(port, '127.0.0.1', () => console.log(`node worker ${worker} on ${port}`));
