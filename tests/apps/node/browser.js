// Drives Debian's Chromium with playwright-core: two browser contexts open the chat
// page through corral, each sends a message, each must show both; then the status
// page is opened and a screenshot taken. Prints a JSON report.
//   node browser.js https://127.0.0.1:8443/ http://127.0.0.1:9000 shot.png user pass
const { chromium } = require('playwright-core');

const [url, adminUrl, shot, user, pass] = process.argv.slice(2);

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  try {
    const opts = { ignoreHTTPSErrors: true, httpCredentials: { username: user, password: pass } };
    const pages = [];
    for (const name of ['A', 'B']) {
      const ctx = await browser.newContext(opts);
      const page = await ctx.newPage();
      await page.goto(url);
      await page.waitForFunction(() => document.body.dataset.worker, null, { timeout: 15000 });
      pages.push({ name, page });
    }
    for (const { name, page } of pages) {
      await page.fill('#text', `hello from ${name}`);
      await page.press('#text', 'Enter');
    }
    const both = () => {
      const text = [...document.querySelectorAll('.msg')].map((e) => e.textContent).join('\n');
      return text.includes('hello from A') && text.includes('hello from B');
    };
    for (const { page } of pages) await page.waitForFunction(both, null, { timeout: 15000 });
    const report = { pages: [] };
    for (const { name, page } of pages) {
      report.pages.push({
        name,
        worker: await page.evaluate(() => document.body.dataset.worker),
        transport: await page.evaluate('socket.io.engine.transport.name'),
        messages: await page.evaluate(() => [...document.querySelectorAll('.msg')].map((e) => e.textContent)),
      });
    }
    const admin = await browser.newPage({ viewport: { width: 1200, height: 800 } });
    await admin.goto(adminUrl + '/status');
    await admin.waitForFunction(() => document.getElementById('t-sessions').textContent !== '–');
    await admin.waitForTimeout(5000); // a few samples for the charts
    report.status = await admin.evaluate(() => fetch('status.json').then((r) => r.json()));
    await admin.screenshot({ path: shot, fullPage: true });
    console.log(JSON.stringify(report));
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(e); process.exit(1); });
