// What the browser tests share: starting the release `kythera` binary (and a Redis),
// launching Debian's Chromium headless, and the checks on the demo page.
//
// KYTHERA_BIN overrides the binary, CHROMIUM the browser (default /usr/bin/chromium).

import { execFileSync, spawn } from "node:child_process";
import { createHash, X509Certificate } from "node:crypto";
import { mkdirSync, readFileSync } from "node:fs";
import { createServer } from "node:net";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

export const root = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
export const bin = process.env.KYTHERA_BIN ?? join(root, "target/release/kythera");
export const browserPath = process.env.CHROMIUM ?? "/usr/bin/chromium";
export const outDir = join(root, "target/browser");
export const WAIT = 10_000;

mkdirSync(outDir, { recursive: true });

/** Starts kythera with `args`; `addr` resolves once it prints where it listens (its
 * `wss://` address when `scheme` is "wss"). */
export function startServer(args, scheme = "ws") {
  const child = spawn(bin, args, {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, RUST_LOG: "warn", NO_COLOR: "1" },
  });
  let stderr = "";
  child.stderr.on("data", (d) => (stderr += d));
  const addr = new Promise((ok, fail) => {
    let out = "";
    const timer = setTimeout(() => fail(new Error(`kythera did not start: ${stderr}`)), WAIT);
    child.stdout.on("data", (d) => {
      out += d;
      const m = out.match(new RegExp(`listening on ${scheme}://(\\S+)`));
      if (m) {
        clearTimeout(timer);
        ok(m[1]);
      }
    });
    child.on("exit", (code) => fail(new Error(`kythera exited with ${code}: ${stderr}`)));
  });
  return { child, addr, stderr: () => stderr };
}

/** SIGTERM, then waits for exit 0; false (and SIGKILL) otherwise. */
export async function stopServer(server) {
  const exited = new Promise((ok) => server.child.on("exit", (code) => ok(code)));
  server.child.kill("SIGTERM");
  const code = await Promise.race([exited, new Promise((ok) => setTimeout(() => ok("timeout"), WAIT))]);
  if (code !== 0) {
    console.error(`kythera did not exit 0 after SIGTERM: ${code}`);
    server.child.kill("SIGKILL");
    return false;
  }
  return true;
}

/** A port nobody listens on now. */
export function freePort() {
  return new Promise((ok, fail) => {
    const srv = createServer();
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => ok(port));
    });
    srv.on("error", fail);
  });
}

/** Starts Debian's redis-server on a free port, without persistence. */
export async function startRedis() {
  const port = await freePort();
  const child = spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  await new Promise((ok, fail) => {
    let out = "";
    const timer = setTimeout(() => fail(new Error("redis-server did not start")), WAIT);
    child.stdout.on("data", (d) => {
      out += d;
      if (out.includes("Ready to accept connections")) {
        clearTimeout(timer);
        ok();
      }
    });
    child.on("error", fail);
  });
  return { child, url: `redis://127.0.0.1:${port}` };
}

/** A self-signed certificate for localhost made with openssl in `dir`: its files, and
 * the base64 SHA-256 of its public key, which Chromium is told to trust
 * (`--ignore-certificate-errors-spki-list`: that key only, not every certificate). */
export function makeCertificate(dir) {
  mkdirSync(dir, { recursive: true });
  const cert = join(dir, "cert.pem");
  const key = join(dir, "key.pem");
  execFileSync("openssl", [
    "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
    "-days", "2", "-subj", "/CN=localhost",
    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
    "-addext", "basicConstraints=critical,CA:FALSE",
    "-keyout", key, "-out", cert,
  ], { stdio: "ignore" });
  const spki = new X509Certificate(readFileSync(cert)).publicKey.export({ type: "spki", format: "der" });
  return { cert, key, spki: createHash("sha256").update(spki).digest("base64") };
}

/** Headless Chromium, without the background networking this machine cannot reach;
 * `extraArgs` go on its command line. */
export function launchBrowser(extraArgs = []) {
  return chromium.launch({
    executablePath: browserPath,
    headless: true,
    args: [
      ...extraArgs,
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
}

export function check(ok, what) {
  if (!ok) throw new Error(`check failed: ${what}`);
  console.log(`ok - ${what}`);
}

export async function messages(page) {
  return page.locator("#messages li").allInnerTexts();
}

export async function waitForMessage(page, text, who) {
  await page.locator("#messages li", { hasText: text }).first().waitFor({ timeout: WAIT });
  check(true, `${who} sees "${text}"`);
}

export async function joinAs(page, name, room) {
  await page.fill("#name", name);
  await page.fill("#room", room);
  await page.click("#join");
}
