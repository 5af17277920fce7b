// The demo page in a real browser: starts the release `kythera` binary on an ephemeral
// port, opens the page in two headless Chromium contexts (two users who share nothing),
// they join a room and chat by room and by name, and every message is checked where it
// must arrive (and not where it must not). A third context tries a taken name. The live
// figures panel must show both shards and the open connections. Screenshots go to
// target/browser/. Exits non-zero on the first failed check, naming it.
//
//   node tools/browser/demo.test.mjs       (after cargo build --release --bin kythera)
//   node tools/browser/demo.test.mjs --tls (the same over https:// and wss://: kythera
//                                           gets a TLS listener with a self-signed
//                                           certificate that Chromium is told to trust)
//
// KYTHERA_BIN overrides the binary, CHROMIUM the browser (default /usr/bin/chromium).

import { join } from "node:path";
import {
  WAIT,
  browserPath,
  check,
  freePort,
  joinAs,
  launchBrowser,
  makeCertificate,
  messages,
  outDir,
  startServer,
  stopServer,
  waitForMessage,
} from "./lib.mjs";

const tls = process.argv.includes("--tls");
const certificate = tls ? makeCertificate(join(outDir, "tls")) : null;
const args = ["--listen", "127.0.0.1:0", "--shards", "2"];
if (tls) {
  args.push("--tls-listen", `127.0.0.1:${await freePort()}`);
  args.push("--tls-cert", certificate.cert, "--tls-key", certificate.key);
}
const server = startServer(args, tls ? "wss" : "ws");
const shot = (who) => join(outDir, `demo-${who}${tls ? "-tls" : ""}.png`);
let browser;
let failed = false;
let tlsVersion;
try {
  const addr = await server.addr;
  // The certificate names localhost.
  const url = tls ? `https://${addr.replace("127.0.0.1", "localhost")}/` : `http://${addr}/`;
  console.log(`kythera at ${url}; ${browserPath}`);
  browser = await launchBrowser(tls ? [`--ignore-certificate-errors-spki-list=${certificate.spki}`] : []);
  const [ctxA, ctxB, ctxC] = [
    await browser.newContext({ viewport: { width: 1100, height: 720 } }),
    await browser.newContext({ viewport: { width: 1100, height: 720 } }),
    await browser.newContext(),
  ];
  const ann = await ctxA.newPage();
  const bob = await ctxB.newPage();
  const errors = [];
  for (const [who, page] of [["ann", ann], ["bob", bob]]) {
    page.on("pageerror", (e) => errors.push(`${who}: ${e.message}`));
    const resp = await page.goto(url);
    check(resp.status() === 200, `${who}'s page loads from GET / (200)`);
    tlsVersion = (await resp.securityDetails())?.protocol;
  }
  check((await ann.title()) === "kythera demo", "the page is the demo page");

  await joinAs(ann, "ann", "lobby");
  await ann.locator('#status[data-state="joined"]').waitFor({ timeout: WAIT });
  check(true, "ann joined lobby");
  await joinAs(bob, "bob", "lobby");
  await bob.locator('#status[data-state="joined"]').waitFor({ timeout: WAIT });
  check(true, "bob joined lobby");

  // A room message reaches everyone in the room, the sender included.
  await ann.fill("#text", "hello from ann");
  await ann.click("#send");
  await waitForMessage(bob, "ann: hello from ann", "bob");
  await waitForMessage(ann, "ann: hello from ann", "ann");

  // Non-ASCII text survives the round trip through the JSON frames.
  await bob.fill("#text", "grüße 🌍 from bob");
  await bob.press("#text", "Enter");
  await waitForMessage(ann, "bob: grüße 🌍 from bob", "ann");

  // A direct message reaches its recipient only.
  await bob.fill("#to", "ann");
  await bob.fill("#text", "psst, ann");
  await bob.click("#send");
  await waitForMessage(ann, "bob → ann: psst, ann", "ann");
  await waitForMessage(bob, "me → ann: psst, ann", "bob (own copy, drawn by the page)");

  // A direct message to nobody comes back as an error frame; the connection stays.
  await bob.fill("#to", "nobody");
  await bob.fill("#text", "anyone?");
  await bob.click("#send");
  await waitForMessage(bob, 'error: no user named "nobody"', "bob");
  check((await bob.getAttribute("#status", "data-state")) === "joined", "bob is still in the room");

  // Every message arrived exactly once.
  const annSaw = await messages(ann);
  const bobSaw = await messages(bob);
  const count = (list, text) => list.filter((l) => l.includes(text)).length;
  check(count(annSaw, "hello from ann") === 1, "ann saw her room message once");
  check(count(bobSaw, "hello from ann") === 1, "bob saw ann's room message once");
  check(count(annSaw, "grüße") === 1, "ann saw bob's room message once");
  check(count(annSaw, "psst, ann") === 1, "ann saw the direct message once");
  check(count(bobSaw, "bob → ann") === 0, "bob did not receive his own direct message");
  check(count(annSaw, "anyone?") === 0, "ann did not see bob's message to nobody");

  // A taken name is refused (409), and the page says so.
  const eve = await ctxC.newPage();
  await eve.goto(url);
  await joinAs(eve, "ann", "lobby");
  await eve.locator('#status[data-state="error"]').waitFor({ timeout: WAIT });
  check(
    (await eve.textContent("#status")).includes("may be taken"),
    "a second \"ann\" is refused and told the name may be taken",
  );

  // The live figures: a row per shard and the open connections (3 stats watchers and
  // 2 chat users, at least), pushed once a second over /stats.
  await ann.waitForFunction(
    () => Number(document.getElementById("total-connections").textContent.replace(/,/g, "")) >= 5,
    null,
    { timeout: WAIT },
  );
  const rows = await ann.locator("#shards tbody tr").count();
  check(rows === 2, `the figures show both shards (${rows} rows)`);
  const total = await ann.textContent("#total-connections");
  check(Number(total) >= 5, `the figures count the open connections (${total})`);
  check((await ann.getAttribute("#stats-status", "data-state")) === "live", "the figures are live");

  if (tls) {
    const scheme = await ann.evaluate(() => location.protocol);
    check(scheme === "https:", `the page came over https (${scheme})`);
    check(tlsVersion?.startsWith("TLS 1."), `the page came over ${tlsVersion}, its certificate trusted`);
  }
  await ann.screenshot({ path: shot("ann"), fullPage: true });
  await bob.screenshot({ path: shot("bob"), fullPage: true });
  console.log(`screenshots: ${shot("ann")}, ${shot("bob")}`);

  // Leaving closes with 1000 and frees the name.
  await bob.click("#leave");
  await bob.locator('#status[data-state="idle"]').waitFor({ timeout: WAIT });
  check(true, "bob left");
  await joinAs(eve, "bob", "lobby");
  await eve.locator('#status[data-state="joined"]').waitFor({ timeout: WAIT });
  check(true, "bob's name is free again once he left");

  check(errors.length === 0, `no script errors on the pages ${errors.join("; ")}`);
} catch (e) {
  failed = true;
  console.error(`FAILED: ${e.message}`);
  console.error(`kythera's log:\n${server.stderr()}`);
} finally {
  if (browser) await browser.close();
  if (!(await stopServer(server))) failed = true;
}
process.exit(failed ? 1 : 0);
