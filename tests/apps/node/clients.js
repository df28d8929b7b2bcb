// Connects N socket.io-client (JS) clients to URL with default transports, waits for
// each to upgrade to websocket, each broadcasts once, then prints a JSON report.
const { io } = require('socket.io-client');

const url = process.argv[2];
const n = Number(process.argv[3] || 10);
// "all": every broadcast should reach every client (a message queue joins the
// workers); otherwise only the clients of the sender's worker.
const reach = process.argv[4] || 'worker';
const deadline = Date.now() + 20000;

function client(i) {
  return new Promise((resolve) => {
    const s = io(url, { reconnection: false, forceNew: true, timeout: 15000 });
    const r = { i, worker: null, upgraded: false, received: [], error: null, socket: s };
    s.on('welcome', (d) => { r.worker = d.worker; });
    s.on('message', (d) => r.received.push(d.from));
    s.on('connect_error', (e) => { r.error = String(e); resolve(r); });
    s.io.engine && s.io.engine.on('upgrade', () => { r.upgraded = true; });
    s.on('connect', () => {
      s.io.engine.on('upgrade', () => { r.upgraded = true; });
      if (s.io.engine.transport.name === 'websocket') r.upgraded = true;
      resolve(r);
    });
  });
}

(async () => {
  const rs = await Promise.all([...Array(n).keys()].map(client));
  const wait = (pred) => new Promise((res) => {
    const t = setInterval(() => { if (pred() || Date.now() > deadline) { clearInterval(t); res(); } }, 50);
  });
  await wait(() => rs.every((r) => r.error || (r.upgraded && r.worker)));
  for (const r of rs) if (!r.error) r.socket.emit('broadcast', { from: r.i });
  const expected = (r) => rs.filter((o) => (reach === 'all' || o.worker === r.worker) && !o.error).length;
  await wait(() => rs.every((r) => r.error || r.received.length >= expected(r)));
  const report = rs.map(({ socket, ...r }) => ({ ...r, expected: expected(r) }));
  for (const r of rs) r.socket.close();
  console.log(JSON.stringify(report));
  process.exit(0);
})();
