// The demo page on two nodes of a cluster: starts Debian's redis-server and two
// release `kythera` nodes on it, opens the page of node A in one headless Chromium
// context and of node B in another; each page must name its node and list both live
// nodes, and the two users chat through /chat by room and by name across the nodes.
// Screenshots go to target/browser/. Exits non-zero on the first failed check.
//
//   node tools/browser/cluster.test.mjs    (after cargo build --release --bin kythera)

import { join } from "node:path";
import {
  WAIT,
  check,
  joinAs,
  launchBrowser,
  messages,
  outDir,
  startRedis,
  startServer,
  stopServer,
  waitForMessage,
} from "./lib.mjs";

const redis = await startRedis();
const nodeArgs = (id) => ["--listen", "127.0.0.1:0", "--shards", "1", "--cluster-redis", redis.url, "--node-id", id];
const servers = [startServer(nodeArgs("node-a")), startServer(nodeArgs("node-b"))];
let browser;
let failed = false;
try {
  const [addrA, addrB] = await Promise.all(servers.map((s) => s.addr));
  console.log(`nodes at ${addrA} and ${addrB}, Redis at ${redis.url}`);
  browser = await launchBrowser();
  const ann = await (await browser.newContext({ viewport: { width: 1100, height: 720 } })).newPage();
  const bob = await (await browser.newContext({ viewport: { width: 1100, height: 720 } })).newPage();
  const errors = [];
  for (const [who, page, addr] of [["ann", ann, addrA], ["bob", bob, addrB]]) {
    page.on("pageerror", (e) => errors.push(`${who}: ${e.message}`));
    const resp = await page.goto(`http://${addr}/`);
    check(resp.status() === 200, `${who}'s page loads from its node`);
  }
  // Each page names its node and the cluster's live nodes.
  for (const [who, page, node] of [["ann", ann, "node-a"], ["bob", bob, "node-b"]]) {
    await page.locator("#cluster:not([hidden])").waitFor({ timeout: WAIT });
    await page.waitForFunction(
      () => document.getElementById("nodes").textContent === "node-a, node-b",
      null,
      { timeout: WAIT },
    );
    check((await page.textContent("#node")) === node, `${who}'s page says it is on ${node}`);
    check(true, `${who}'s page lists both live nodes`);
  }

  await joinAs(ann, "ann", "lobby");
  await ann.locator('#status[data-state="joined"]').waitFor({ timeout: WAIT });
  await joinAs(bob, "bob", "lobby");
  await bob.locator('#status[data-state="joined"]').waitFor({ timeout: WAIT });
  check(true, "ann joined on node-a, bob on node-b");

  // Both nodes know of the other's member before anyone speaks.
  for (const addr of [addrA, addrB]) {
    const deadline = Date.now() + WAIT;
    for (;;) {
      const text = await (await fetch(`http://${addr}/metrics`)).text();
      if (/kythera_registry_remote_members\{gear="\/chat"\} 1\b/.test(text)) break;
      if (Date.now() > deadline) throw new Error(`${addr} never saw the other node's member`);
      await new Promise((ok) => setTimeout(ok, 50));
    }
  }
  check(true, "each node knows the other's room member");
  await ann.fill("#text", "hello from node-a");
  await ann.click("#send");
  await waitForMessage(bob, "ann: hello from node-a", "bob on node-b");
  await bob.fill("#text", "hello back from node-b");
  await bob.click("#send");
  await waitForMessage(ann, "bob: hello back from node-b", "ann on node-a");
  await waitForMessage(bob, "bob: hello back from node-b", "bob (his own room message)");

  // A direct message across nodes reaches its recipient only, once.
  await ann.fill("#to", "bob");
  await ann.fill("#text", "psst, bob");
  await ann.click("#send");
  await waitForMessage(bob, "ann → bob: psst, bob", "bob on node-b");
  const count = (list, text) => list.filter((l) => l.includes(text)).length;
  check(count(await messages(bob), "psst, bob") === 1, "bob saw the direct message once");
  check(count(await messages(ann), "hello back from node-b") === 1, "ann saw bob's room message once");
  check(count(await messages(bob), "hello from node-a") === 1, "bob saw ann's room message once");

  // The name held on node-a is taken on node-b too.
  const eve = await (await browser.newContext()).newPage();
  await eve.goto(`http://${addrB}/`);
  await joinAs(eve, "ann", "lobby");
  await eve.locator('#status[data-state="error"]').waitFor({ timeout: WAIT });
  check(true, "a second \"ann\" on node-b is refused");

  await ann.screenshot({ path: join(outDir, "cluster-ann-node-a.png"), fullPage: true });
  await bob.screenshot({ path: join(outDir, "cluster-bob-node-b.png"), fullPage: true });
  check(errors.length === 0, `no script errors on the pages ${errors.join("; ")}`);
} catch (e) {
  failed = true;
  console.error(`FAILED: ${e.message}`);
  for (const s of servers) console.error(`kythera's log:\n${s.stderr()}`);
} finally {
  if (browser) await browser.close();
  for (const s of servers) {
    if (!(await stopServer(s))) failed = true;
  }
  redis.child.kill("SIGKILL");
}
process.exit(failed ? 1 : 0);
