// A reviewer in a real headless Chromium: log in, look at the task list, open a task, check the photo, the
// pre-filled guess and that every class choice is inside the viewport and clickable, pick another class,
// submit. Prints one JSON line with what it saw; exits non-zero on any failure.
//
// With "stream": true it first works as a reviewer does: the "To review" tab, then "Label All Tasks": which task
// comes first, what is pre-selected and what the note above the choices says; submit it as is, see which task
// comes next, and read the tab again (the submitted task must have left it).
//
// usage: node review.js '{"url": ..., "email": ..., "password": ..., "project": 1, "task": 3,
//                         "pick": "sofa", "classes": ["chair", "sofa", "table"], "screenshot": "test-artifacts/x.png",
//                         "viewport": [1280, 800], "stream": true}'
// Caveat: choice labels render as "sofa[2]" (hotkey hint), so labels are matched by prefix, not exact text.
const { chromium } = require('playwright-core');

const ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'];

async function checkedChoice(page, classes) {
  const radios = await page.locator('input[type=radio]').evaluateAll((els) => els.map((el) => {
    let node = el;  // the nearest ancestor with text is the choice's label
    while (node && !node.textContent.trim()) node = node.parentElement;
    return { text: node ? node.textContent.trim() : '', checked: el.checked };
  }));
  const choices = radios.filter((r) => classes.some((c) => r.text === c || r.text.startsWith(`${c}[`)));
  return (choices.find((r) => r.checked) || { text: '' }).text;
}

async function labelAllTasks(page, o, out) {
  const served = [];  // task ids in the order the labeling stream hands them out
  out.apiCalls = [];
  page.on('response', async (r) => {
    if (r.url().includes('/api/')) out.apiCalls.push(`${r.request().method()} ${r.url().replace(o.url, '')}`);
    // Label Studio 1.23's stream asks POST /api/dm/actions?id=next_task (older ones GET /api/projects/N/next)
    if (/id=next_task|\/api\/projects\/\d+\/next/.test(r.url())) {
      try { served.push((await r.json()).id); } catch (e) { /* not JSON: the stream ended */ }
    }
  });
  const until = async (cond) => { for (let i = 0; i < 600 && !cond(); i += 1) await page.waitForTimeout(100); };
  const footer = async () => ((await page.locator('body').innerText()).match(/Tasks:\s*(\d+)\s*\/\s*(\d+)/) || []).slice(1);
  await page.locator('button', { hasText: /Label All Tasks/ }).first().waitFor();
  out.tabBefore = await footer();
  await page.locator('button', { hasText: /Label All Tasks/ }).first().click();
  await until(() => served.length >= 1);
  await page.locator('label', { hasText: new RegExp(`^\\s*${o.classes[0]}`) }).first().waitFor();
  await page.waitForTimeout(500);
  // the stream opens with the project's instructions in a dialog: read them, then close it as a reviewer would
  const dialog = page.getByText('Labeling Instructions');
  if (await dialog.isVisible()) {
    out.instructionsShown = true;
    await page.keyboard.press('Escape');
    await dialog.waitFor({ state: 'hidden' });
  }
  out.streamText = await page.locator('body').innerText();
  out.streamPrefilled = await checkedChoice(page, o.classes);
  if (o.screenshot) await page.screenshot({ path: o.screenshot.replace(/\.png$/, '-stream.png') });
  const submit = page.locator('button', { hasText: /^\s*Submit\s*$/ }).first();
  const [response] = await Promise.all([
    page.waitForResponse((r) => /\/api\/tasks\/\d+\/annotations/.test(r.url()) && r.request().method() === 'POST'),
    submit.click(),
  ]);
  out.streamAnnotation = await response.json();
  await until(() => served.length >= 2);
  out.served = served.slice();
  await page.goto(`${o.url}/projects/${o.project}/data`);
  await page.locator('img[src*="local-files"]').first().waitFor({ state: 'visible' });
  await page.waitForTimeout(500);
  out.tabAfter = await footer();
}

async function main() {
  const o = JSON.parse(process.argv[2]);
  const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || '/usr/bin/chromium', args: ARGS });
  const out = {};
  const [width, height] = o.viewport || [1280, 800];
  const page = await browser.newPage({ viewport: { width, height } });
  try {
    page.setDefaultTimeout(o.timeout_ms || 60000);

    await page.goto(`${o.url}/user/login/`);
    await page.fill('input[name=email]', o.email);
    await page.fill('input[name=password]', o.password);
    await Promise.all([page.waitForURL((u) => !u.pathname.startsWith('/user/login')), page.click('button[type=submit]')]);

    // the task list: what a reviewer reads there (columns shown, in the first tab)
    await page.goto(`${o.url}/projects/${o.project}/data`);
    await page.locator('img[src*="local-files"]').first().waitFor({ state: 'visible' });
    await page.waitForTimeout(500);
    out.listText = await page.locator('body').innerText();
    if (o.screenshot) await page.screenshot({ path: o.screenshot.replace(/\.png$/, '-list.png') });

    if (o.stream) await labelAllTasks(page, o, out);

    await page.goto(`${o.url}/projects/${o.project}/data?task=${o.task}`);
    // the task's photo, served in place through /data/local-files/
    const img = page.locator('img[src*="local-files"]').last();
    await img.waitFor({ state: 'visible' });
    await page.waitForFunction((el) => el.complete && el.naturalWidth > 0, await img.elementHandle());
    out.naturalWidth = await img.evaluate((el) => el.naturalWidth);
    out.imageSrc = await img.getAttribute('src');

    // the model's guess is pre-filled: its radio button is checked
    // the model's guess is pre-filled: among the class choices ("chair[1]", ...), its radio is checked
    await page.locator('label', { hasText: new RegExp(`^\\s*${o.pick}`) }).first().waitFor();
    const radios = await page.locator('input[type=radio]').evaluateAll((els) => els.map((el) => {
      let node = el;  // the nearest ancestor with text is the choice's label
      while (node && !node.textContent.trim()) node = node.parentElement;
      return { text: node ? node.textContent.trim() : '', checked: el.checked };
    }));
    out.choices = radios.filter((r) => o.classes.some((c) => r.text === c || r.text.startsWith(`${c}[`)));
    out.prefilled = (out.choices.find((r) => r.checked) || { text: '' }).text;

    // every choice must be on screen and be what a click at its centre reaches (nothing covers it)
    out.viewport = { width, height };
    out.boxes = [];
    for (const cls of o.classes) {
      const label = page.locator('label', { hasText: new RegExp(`^\\s*${cls}(\\[|$)`) }).first();
      const box = await label.boundingBox();
      const hit = box && await page.evaluate(([x, y, text]) => {
        const el = document.elementFromPoint(x, y);
        const owner = el && el.closest('label');
        return !!owner && owner.textContent.trim().startsWith(text);
      }, [box.x + box.width / 2, box.y + box.height / 2, cls]);
      out.boxes.push({ cls, box, clickable: !!hit });
    }
    if (o.screenshot) await page.screenshot({ path: o.screenshot.replace(/\.png$/, '-choices.png') });

    // pick another class and submit
    await page.locator('label', { hasText: new RegExp(`^\\s*${o.pick}`) }).first().click();
    const submit = page.locator('button', { hasText: /^\s*Submit\s*$/ }).first();
    await submit.waitFor();
    const [response] = await Promise.all([
      page.waitForResponse((r) => r.url().includes(`/api/tasks/${o.task}/annotations`) && r.request().method() === 'POST'),
      submit.click(),
    ]);
    out.status = response.status();
    out.annotation = await response.json();
    await page.waitForTimeout(500);
    if (o.screenshot) await page.screenshot({ path: o.screenshot, fullPage: false });
  } catch (err) {
    // keep evidence of what the page looked like
    if (o.screenshot) await page.screenshot({ path: o.screenshot.replace(/\.png$/, '-error.png') }).catch(() => {});
    err.message += `\nbuttons: ${JSON.stringify(await page.locator('button').allInnerTexts().catch(() => []))}`;
    throw err;
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(out));
}

main().catch((err) => {
  console.error(err && err.stack ? err.stack : String(err));
  process.exit(1);
});
