// End-to-end test of `ldm serve`'s web page in headless Chromium (Debian's /usr/bin/chromium,
// driven by playwright-core): type a prompt and generate, watch the progress bar and previews,
// cancel a running job, and inpaint with a mask drawn on the image. Screenshots go to OUTDIR.
//
//     node tools/browser/page_test.mjs http://127.0.0.1:PORT OUTDIR
//
// Run by crates/ldm-server/tests/clients.rs, which starts the server.

import { chromium } from "playwright-core";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";

const [url, outDir] = process.argv.slice(2);
if (!url || !outDir) {
  console.error("usage: page_test.mjs URL OUTDIR");
  process.exit(2);
}
mkdirSync(outDir, { recursive: true });

function check(cond, message) {
  if (!cond) throw new Error("check failed: " + message);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const results = {};
try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(url);
  await page.waitForFunction(() => document.getElementById("model-name").textContent.startsWith("shapes"));
  check(await page.locator("#sampler option").count() >= 19, "the sampler list is filled");
  check(await page.inputValue("#width") === "64", "the model's default size");

  // 1. Type a prompt, generate, get a card with the image and its parameters.
  await page.fill("#prompt", "a red circle on a blue background");
  await page.fill("#seed", "5");
  await page.fill("#steps", "12");
  await page.click("#generate");
  await page.waitForSelector(".card", { timeout: 60000 });
  await page.waitForFunction(() => document.getElementById("status").textContent === "done");
  const info = await page.textContent(".card pre");
  check(info.includes("a red circle on a blue background") && info.includes("Seed: 5"), "the card shows the parameters: " + info);
  check(await page.getAttribute(".card a", "download") === "ldm-5.png", "a download link");
  check(await page.evaluate(() => document.getElementById("progress").value) === 1, "progress at 1 when done");
  await page.screenshot({ path: join(outDir, "generated.png") });
  results.generated = true;

  // 2. Watch progress and previews on a longer job (128 px, 80 steps), and the queue.
  await page.fill("#width", "128");
  await page.fill("#height", "128");
  await page.fill("#steps", "80");
  await page.fill("#prompt", "a blue square on a yellow background");
  await page.click("#generate");
  await page.waitForFunction(() => {
    const v = document.getElementById("progress").value;
    return v > 0.1 && v < 0.9;
  }, null, { timeout: 60000 });
  await page.waitForFunction(() => document.getElementById("preview").src.startsWith("data:image/png"));
  await page.waitForFunction(() => /step \d+\/80/.test(document.getElementById("status").textContent));
  await page.waitForFunction(() => document.getElementById("queue").textContent.includes("running"), null, { timeout: 10000 });
  await page.screenshot({ path: join(outDir, "progress.png") });
  await page.waitForFunction(() => document.querySelectorAll(".card").length === 2, null, { timeout: 120000 });
  results.progress = true;

  // 3. Cancel a running job: no card is added.
  await page.fill("#steps", "150");
  await page.click("#generate");
  await page.waitForFunction(() => /step \d+\/150/.test(document.getElementById("status").textContent), null, { timeout: 60000 });
  check(!(await page.isDisabled("#cancel")), "cancel is enabled while running");
  await page.click("#cancel");
  await page.waitForFunction(() => document.getElementById("status").textContent === "cancelled", null, { timeout: 30000 });
  check(await page.locator(".card").count() === 2, "a cancelled job adds no card");
  check(await page.isDisabled("#cancel"), "cancel is disabled again");
  await page.waitForFunction(() => !document.getElementById("queue").textContent.includes("running"), null, { timeout: 10000 });
  await page.screenshot({ path: join(outDir, "cancelled.png") });
  results.cancelled = true;

  // 4. Inpaint: the first result as the init image, the left half painted over as the mask.
  const first = await page.getAttribute(".card:last-child img", "src");
  const initPath = join(outDir, "init.png");
  writeFileSync(initPath, Buffer.from(first.split(",")[1], "base64"));
  await page.fill("#width", "64");
  await page.fill("#height", "64");
  await page.dispatchEvent("#width", "change");
  await page.fill("#steps", "16");
  await page.fill("#strength", "1");
  await page.fill("#prompt", "a yellow triangle on a green background");
  await page.check("input[name=mode][value=inpaint]");
  await page.setInputFiles("#init-file", initPath);
  await page.waitForFunction(() => {
    const c = document.getElementById("image-canvas");
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    return d.some((v, i) => i % 4 !== 3 && v > 0);
  });
  const box = await page.locator("#mask-canvas").boundingBox();
  await page.fill("#brush", "40");
  for (let y = 0.05; y < 1; y += 0.1) {
    await page.mouse.move(box.x + box.width * 0.02, box.y + box.height * y);
    await page.mouse.down();
    await page.mouse.move(box.x + box.width * 0.4, box.y + box.height * y, { steps: 8 });
    await page.mouse.up();
  }
  const masked = await page.evaluate(() => {
    const c = document.getElementById("mask-canvas");
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    let left = 0, right = 0;
    for (let y = 0; y < c.height; y++) for (let x = 0; x < c.width; x++) {
      const white = d[(y * c.width + x) * 4] > 127;
      if (white && x < c.width / 2) left++;
      if (white && x >= c.width * 0.75) right++;
    }
    return { left, right };
  });
  check(masked.left > 500 && masked.right === 0, "the mask covers the left half only: " + JSON.stringify(masked));
  await page.screenshot({ path: join(outDir, "mask.png") });
  await page.click("#generate");
  await page.waitForFunction(() => document.querySelectorAll(".card").length === 3, null, { timeout: 60000 });
  const change = await page.evaluate(async ([a, b]) => {
    const load = (src) => new Promise((ok) => { const i = new Image(); i.onload = () => ok(i); i.src = src; });
    const pixels = async (src) => {
      const img = await load(src);
      const c = document.createElement("canvas");
      c.width = img.width; c.height = img.height;
      const ctx = c.getContext("2d");
      ctx.drawImage(img, 0, 0);
      return ctx.getImageData(0, 0, c.width, c.height);
    };
    const [p, q] = [await pixels(a), await pixels(b)];
    let left = 0, right = 0, nl = 0, nr = 0;
    for (let y = 0; y < p.height; y++) for (let x = 0; x < p.width; x++) {
      const i = (y * p.width + x) * 4;
      const d = (Math.abs(p.data[i] - q.data[i]) + Math.abs(p.data[i + 1] - q.data[i + 1]) + Math.abs(p.data[i + 2] - q.data[i + 2])) / 3;
      if (x < p.width * 0.3) { left += d; nl++; }
      if (x >= p.width * 0.75) { right += d; nr++; }
    }
    return { left: left / nl, right: right / nr };
  }, [first, await page.getAttribute(".card:first-child img", "src")]);
  check(change.right < 12 && change.left > change.right + 10, "inpainting changed the masked half only: " + JSON.stringify(change));
  await page.screenshot({ path: join(outDir, "inpainted.png") });
  results.inpainted = change;
  check(errors.length === 0, "no script errors: " + errors.join("; "));
  console.log(JSON.stringify({ ok: true, results }));
} catch (e) {
  console.error(String(e && e.stack || e));
  console.log(JSON.stringify({ ok: false, results }));
  process.exitCode = 1;
} finally {
  await browser.close();
}
