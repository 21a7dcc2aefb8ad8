'use strict';
// The registry dashboard: one EventSource ('api/events') brings snapshots; everything else is
// rendered locally. All data comes from the network, so the DOM is built with textContent and
// createElement(NS) only — never innerHTML.
(() => {
  const SVG_NS = 'http://www.w3.org/2000/svg';
  const NODE_W = 156, NODE_H = 46, COL_GAP = 150, PAD = 20, LABEL_H = 14;
  const MAX_COLUMNS = 6, MIN_SCALE = 0.8;
  const LABEL_FONT = '11px system-ui, -apple-system, "Segoe UI", Roboto, sans-serif'; // as in the CSS
  const LABEL_ALL_MAX_EDGES = 20;
  const RECONNECT_MS = 10000;
  const COLORS = { ok: '#16a34a', warn: '#d97706', bad: '#dc2626', idle: '#9ca3af' };

  // receivedAt: Date.now() when snap arrived; ages are counted on the registry's clock.
  // selected, hover: {kind: 'service', name} | {kind: 'edge', source, destination} | null
  const state = { snap: null, receivedAt: 0, model: null, selected: null, hover: null, conn: 'connecting',
    es: null, retryTimer: 0, retryAllowedAt: 0 };
  const $ = (id) => document.getElementById(id);

  // ---- formatting -------------------------------------------------------------------------
  const isNum = (v) => typeof v === 'number' && Number.isFinite(v);
  const fmtRps = (v) => (isNum(v) ? (v >= 100 ? Math.round(v).toLocaleString('en') : v.toFixed(1)) : '—');
  const fmtInt = (v) => (isNum(v) ? Math.round(v).toLocaleString('en') : '—');
  // Floor, so 99.96% never reads as a perfect 100.0%.
  const fmtPct = (v) => (isNum(v) ? `${(Math.floor(v * 1000 + 1e-6) / 10).toFixed(1)}%` : '—');
  function fmtMs(seconds) {
    if (!isNum(seconds)) return '—';
    const ms = seconds * 1000;
    if (ms >= 1000) return `${seconds.toFixed(seconds >= 10 ? 0 : 1)} s`;
    if (ms >= 10 || ms === 0) return `${Math.round(ms)} ms`;
    return `${ms.toFixed(ms >= 1 ? 1 : 2)} ms`;
  }
  function fmtSpan(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 90) return `${s} s`;
    if (s < 5400) return `${Math.round(s / 60)} min`;
    return `${Math.round(s / 3600)} h`;
  }
  const rateClass = (sr) => (!isNum(sr) ? 'idle' : sr >= 0.99 ? 'ok' : sr >= 0.95 ? 'warn' : 'bad');
  const edgeKey = (source, destination) => `${source}\u0000${destination}`;
  const registryNow = () =>
    (state.snap ? state.snap.generated_at : Date.now() / 1000) + (Date.now() - state.receivedAt) / 1000;

  // ---- DOM helpers ------------------------------------------------------------------------
  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }
  function s(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    setAttrs(node, attrs);
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function setAttrs(node, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') node.setAttribute('class', v);
      else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? '' : String(v));
    }
  }
  // Rebuilding a container each snapshot would drop keyboard focus; put it back by key.
  function rebuild(container, build) {
    const active = document.activeElement;
    const key = active && container.contains(active) ? active.dataset.focusKey : undefined;
    container.replaceChildren(...[].concat(build()));
    if (key !== undefined) {
      const again = [...container.querySelectorAll('[data-focus-key]')].find((n) => n.dataset.focusKey === key);
      if (again) again.focus();
    }
  }
  const badge = (text, cls) => h('span', { class: `badge ${cls}` }, text);
  const rateText = (sr) => h('span', { class: `rate ${rateClass(sr)}` }, fmtPct(sr));
  const onActivate = (fn) => ({
    onclick: fn, onkeydown: (ev) => { if (ev.key === 'Enter' || ev.key === ' ') { ev.preventDefault(); fn(); } },
  });

  // ---- model ------------------------------------------------------------------------------
  function buildModel(snap) {
    const services = new Map();
    for (const svc of snap.services || []) services.set(svc.service, svc);
    const edges = (snap.edges || []).slice();
    // An external host may appear only as an edge's destination: give it a node of its own.
    for (const e of edges) {
      for (const name of [e.source, e.destination]) {
        if (services.has(name)) continue;
        services.set(name, {
          service: name, registered: false, instances: 0, healthy_instances: 0, healthy: false,
          requests: 0, rps: 0, success_rate: null, latency: {}, members: [], synthetic: true,
        });
      }
    }
    for (const e of edges) {
      const dst = services.get(e.destination);
      if (dst.synthetic) { dst.requests += e.requests || 0; dst.rps += e.rps || 0; }
    }
    const names = [...services.keys()].sort();
    const edgeMap = new Map(edges.map((e) => [edgeKey(e.source, e.destination), e]));
    return { services, names, edges, edgeMap, layout: layout(names, edges) };
  }

  // Columns are BFS depth from the entry nodes, so every edge spans at most one column forward
  // and never runs across a node; longest-path layering would be deeper and much wider.
  // Depth of each node along its longest path from an entry, back edges of cycles ignored.
  function longestPaths(names, out) {
    const order = [];
    const state = new Map(); // 1: on the DFS stack, 2: done
    const visit = (n) => {
      state.set(n, 1);
      for (const m of out.get(n)) if (!state.has(m)) visit(m);
      state.set(n, 2);
      order.push(n);
    };
    for (const n of names) if (!state.has(n)) visit(n);
    order.reverse(); // a topological order of the graph without its back edges
    const rank = new Map(order.map((n, i) => [n, i]));
    const depth = new Map(names.map((n) => [n, 0]));
    for (const n of order) {
      for (const m of out.get(n)) {
        if (rank.get(m) > rank.get(n)) depth.set(m, Math.max(depth.get(m), depth.get(n) + 1));
      }
    }
    return depth;
  }

  function layout(names, edges) {
    const out = new Map(names.map((n) => [n, []]));
    const indeg = new Map(names.map((n) => [n, 0]));
    for (const e of edges) {
      if (e.source === e.destination) continue;
      out.get(e.source).push(e.destination);
      indeg.set(e.destination, indeg.get(e.destination) + 1);
    }
    for (const list of out.values()) list.sort();
    const depth = new Map();
    const bfs = (starts) => {
      const queue = [...starts];
      for (const n of starts) depth.set(n, 0);
      while (queue.length) {
        const n = queue.shift();
        for (const m of out.get(n)) if (!depth.has(m)) { depth.set(m, depth.get(n) + 1); queue.push(m); }
      }
    };
    bfs(names.filter((n) => indeg.get(n) === 0));
    for (const n of names) if (!depth.has(n)) bfs([n]); // a component that is only a cycle
    // Longest-path columns read best (a caller left of everything it calls, even when an
    // entry point also calls deep services directly, as health probes do); when they would
    // make too many columns to read, the breadth-first ones above stay.
    const longest = longestPaths(names, out);
    if (Math.max(0, ...longest.values()) < MAX_COLUMNS) for (const [n, d] of longest) depth.set(n, d);
    const columns = [];
    for (const n of names) (columns[depth.get(n)] ||= []).push(n);
    const rows = Math.max(1, ...columns.map((c) => c.length));
    const rowPitch = names.length <= 12 ? NODE_H + 56 : NODE_H + 18;
    const pos = new Map();
    columns.forEach((col, ci) => {
      const offset = ((rows - col.length) * rowPitch) / 2;
      col.forEach((n, ri) => pos.set(n, { x: PAD + ci * (NODE_W + COL_GAP), y: PAD + offset + ri * rowPitch, col: ci }));
    });
    // Room on the right for the arcs between neighbours in the last column.
    const last = columns.length - 1;
    const arcs = edges.some((e) => depth.get(e.source) === last && depth.get(e.destination) === last);
    const width = PAD * 2 + columns.length * NODE_W + Math.max(0, last) * COL_GAP + (arcs ? 60 : 0);
    const height = PAD * 2 + (rows - 1) * rowPitch + NODE_H;
    return { pos, width, height };
  }

  // ---- topology graph ---------------------------------------------------------------------
  const graph = { svg: null, edgeLayer: null, nodeLayer: null, nodes: new Map(), edges: new Map() };

  function initGraph() {
    const svg = $('topology');
    const defs = s('defs');
    for (const [cls, color] of Object.entries(COLORS)) {
      const marker = s('marker', {
        id: `arrow-${cls}`, viewBox: '0 0 10 10', refX: 2, refY: 5, markerWidth: 10, markerHeight: 10,
        markerUnits: 'userSpaceOnUse', orient: 'auto',
      });
      marker.append(s('path', { d: 'M0,0 L10,5 L0,10 z', fill: color }));
      defs.append(marker);
    }
    Object.assign(graph, { svg, edgeLayer: s('g', { class: 'edges' }), nodeLayer: s('g', { class: 'nodes' }) });
    svg.append(defs, graph.edgeLayer, graph.nodeLayer);
    const selectionOf = (t) => (!t ? null : t.classList.contains('node')
      ? { kind: 'service', name: t.dataset.service }
      : { kind: 'edge', source: t.dataset.source, destination: t.dataset.destination });
    svg.addEventListener('click', (ev) => select(selectionOf(ev.target.closest('.node, .edge'))));
    svg.addEventListener('keydown', (ev) => {
      const node = ev.target.closest('.node');
      if (node && (ev.key === 'Enter' || ev.key === ' ')) { ev.preventDefault(); select(selectionOf(node)); }
    });
    const hover = (ev) => {
      const next = selectionOf(ev.target.closest('.node, .edge'));
      if (JSON.stringify(next) !== JSON.stringify(state.hover)) { state.hover = next; highlight(); }
    };
    svg.addEventListener('mouseover', hover);
    svg.addEventListener('focusin', hover);
    svg.addEventListener('mouseleave', () => { state.hover = null; highlight(); });
    svg.addEventListener('focusout', () => { state.hover = null; highlight(); });
  }

  function ensureNode(name) {
    let g = graph.nodes.get(name);
    if (g) return g;
    g = s('g', { class: 'node', 'data-service': name, tabindex: 0, role: 'button' });
    g.append(s('title'), s('rect', { width: NODE_W, height: NODE_H, rx: 8, ry: 8 }),
      s('circle', { class: 'dot', cx: 14, cy: 17, r: 4 }),
      s('text', { class: 'name', x: 24, y: 21 }), s('text', { class: 'sub', x: 14, y: 37 }));
    graph.nodes.set(name, g);
    return g;
  }

  function ensureEdge(key, e) {
    let g = graph.edges.get(key);
    if (g) return g;
    g = s('g', { class: 'edge', 'data-source': e.source, 'data-destination': e.destination });
    // The visible path comes first, so it is the one `g.querySelector('path')` finds.
    g.append(s('path', { class: 'line', fill: 'none' }), s('path', { class: 'hit', fill: 'none' }),
      s('title'), s('text', { class: 'edge-label', 'text-anchor': 'middle' }));
    graph.edges.set(key, g);
    return g;
  }

  const truncate = (text, max) => (text.length > max ? `${text.slice(0, max - 1)}…` : text);

  function edgeGeometry(a, b) {
    const [ay, by] = [a.y + NODE_H / 2, b.y + NODE_H / 2];
    if (a === b) {
      const x = a.x + NODE_W;
      return { d: `M${x},${ay - 10} C${x + 46},${ay - 44} ${x + 46},${ay + 44} ${x + 8},${ay + 12}`, lx: x + 40, ly: ay + 4, anchor: 'start' };
    }
    if (b.col > a.col) {
      const x1 = a.x + NODE_W;
      const x2 = b.x - 8; // leaves room for the arrowhead
      const dx = (x2 - x1) / 2;
      return { d: `M${x1},${ay} C${x1 + dx},${ay} ${x2 - dx},${by} ${x2},${by}`, lx: (x1 + b.x) / 2, ly: (ay + by) / 2 - 6, anchor: 'middle' };
    }
    if (b.col === a.col) {
      // Same column: bulge out to the right, the farther apart the wider, so arcs nest.
      const [x1, x2] = [a.x + NODE_W, b.x + NODE_W + 8];
      const bulge = Math.min(COL_GAP * 0.55, 26 + Math.abs(by - ay) * 0.18);
      const d = `M${x1},${ay} C${x1 + bulge},${ay} ${x2 + bulge},${by} ${x2},${by}`;
      // Neighbours: the label fits in the gap between the two boxes, right beside the arc,
      // instead of out in the column gap where the forward edges' labels are.
      if (Math.abs(by - ay) < 2 * NODE_H) return { d, lx: x1 - 12, ly: (ay + by) / 2 + 4, anchor: 'end' };
      return { d, lx: x1 + bulge * 0.75 + 4, ly: (ay + by) / 2 + 4, anchor: 'start' };
    }
    // A back edge (a cycle): leave to the left, come in from the right, dipping below.
    const [x1, x2] = [a.x, b.x + NODE_W + 8];
    const d = `M${x1},${ay} C${x1 - 70},${ay + 50} ${x2 + 70},${by + 50} ${x2},${by}`;
    return { d, lx: (x1 + x2) / 2, ly: (ay + by) / 2 + 40, anchor: 'middle' };
  }

  // Greedy: nudge each label up or down until it clears the nodes and the labels placed so far.
  let measureCtx = null;
  function textWidth(text) {
    measureCtx ||= document.createElement('canvas').getContext('2d');
    measureCtx.font = LABEL_FONT;
    return measureCtx.measureText(text).width;
  }

  function placeLabels(geos, texts, pos) {
    const boxes = [...pos.values()].map((p) => ({ x1: p.x + 2, y1: p.y, x2: p.x + NODE_W - 2, y2: p.y + NODE_H }));
    const hits = (b) => boxes.some((o) => b.x1 < o.x2 && b.x2 > o.x1 && b.y1 < o.y2 && b.y2 > o.y1);
    geos.forEach((geo, i) => {
      const w = textWidth(texts[i]);
      const x1 = geo.anchor === 'middle' ? geo.lx - w / 2 : geo.anchor === 'end' ? geo.lx - w : geo.lx;
      const boxAt = (dy) => ({ x1, x2: x1 + w, y1: geo.ly + dy - LABEL_H + 3, y2: geo.ly + dy + 3 });
      const dy = [0, -1, 1, -2, 2, -3, 3].map((k) => k * LABEL_H).find((d) => !hits(boxAt(d))) ?? 0;
      boxes.push(boxAt(dy));
      geo.ly += dy;
    });
  }

  function renderGraph(model) {
    const { pos, width, height } = model.layout;
    const svg = graph.svg;
    svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
    // Never shrunk below MIN_SCALE: a wide mesh scrolls sideways rather than turn unreadable.
    svg.style.minWidth = `${Math.round(width * MIN_SCALE)}px`;
    // Never scale up past 1:1, so the five-service demo does not become a poster.
    svg.style.maxWidth = `${width}px`;
    svg.classList.toggle('dense', model.edges.length > LABEL_ALL_MAX_EDGES);
    $('graph-empty').hidden = model.names.length > 0;

    const geos = model.edges.map((e) => edgeGeometry(pos.get(e.source), pos.get(e.destination)));
    const texts = model.edges.map((e) => `${fmtRps(e.rps)} rps · p99 ${fmtMs(e.latency && e.latency.p99)}`);
    placeLabels(geos, texts, pos);
    const seenEdges = new Set();
    model.edges.forEach((e, i) => {
      const key = edgeKey(e.source, e.destination);
      seenEdges.add(key);
      const g = ensureEdge(key, e);
      const cls = rateClass(e.success_rate);
      const [geo, text] = [geos[i], texts[i]];
      const strokeW = 1.5 + 4.5 * Math.min(1, Math.log10(1 + Math.max(0, e.rps || 0)) / 2);
      g.setAttribute('class', `edge ${cls}`);
      g.setAttribute('data-success-rate', isNum(e.success_rate) ? String(e.success_rate) : '');
      const [line, hit, title, label] = g.children;
      setAttrs(line, { d: geo.d, stroke: COLORS[cls], 'stroke-width': strokeW.toFixed(2), 'marker-end': `url(#arrow-${cls})` });
      hit.setAttribute('d', geo.d);
      title.textContent = `${e.source} → ${e.destination}: ${text}, success ${fmtPct(e.success_rate)}`;
      setAttrs(label, { x: geo.lx.toFixed(1), y: geo.ly.toFixed(1), 'text-anchor': geo.anchor });
      label.textContent = text;
      if (g.parentNode !== graph.edgeLayer) graph.edgeLayer.append(g);
    });
    for (const [key, g] of graph.edges) if (!seenEdges.has(key)) { g.remove(); graph.edges.delete(key); }

    const outRps = new Map();
    for (const e of model.edges) outRps.set(e.source, (outRps.get(e.source) || 0) + (e.rps || 0));
    for (const name of model.names) {
      const svc = model.services.get(name);
      const g = ensureNode(name);
      const p = pos.get(name);
      const down = svc.registered && !svc.healthy_instances;
      g.setAttribute('class', `node ${svc.registered ? 'registered' : 'external'}${down ? ' down' : ''}`);
      g.setAttribute('transform', `translate(${p.x},${p.y})`);
      const [title, , , nameText, sub] = g.children;
      const kind = !svc.registered ? 'not registered' : down ? 'down' : `${svc.healthy_instances}/${svc.instances} healthy`;
      title.textContent = `${name} (${kind})`;
      g.setAttribute('aria-label', `${name}, ${kind}`);
      nameText.textContent = truncate(name, 17);
      // A pure caller (anonymous) receives nothing; what it sends says more.
      const line = !svc.requests && outRps.get(name)
        ? [`sends ${fmtRps(outRps.get(name))} rps`]
        : [`${fmtRps(svc.rps)} rps · `, fmtPct(svc.success_rate)];
      sub.replaceChildren(s('tspan', {}, line[0]));
      if (line[1]) sub.append(s('tspan', { class: `rate ${rateClass(svc.success_rate)}` }, line[1]));
      if (g.parentNode !== graph.nodeLayer) graph.nodeLayer.append(g);
    }
    const seenNodes = new Set(model.names);
    for (const [name, g] of graph.nodes) if (!seenNodes.has(name)) { g.remove(); graph.nodes.delete(name); }
    highlight();
  }

  function highlight() {
    const { selected: sel, hover: hov } = state;
    const touches = (f, e) => f && (f.kind === 'service'
      ? e.dataset.source === f.name || e.dataset.destination === f.name
      : e.dataset.source === f.source && e.dataset.destination === f.destination);
    for (const g of graph.edges.values()) {
      g.classList.toggle('selected', !!sel && sel.kind === 'edge' && touches(sel, g));
      g.classList.toggle('lit', !!(touches(sel, g) || touches(hov, g)));
    }
    for (const [name, g] of graph.nodes) {
      const isSel = !!sel && sel.kind === 'service' && sel.name === name;
      const isEnd = !!sel && sel.kind === 'edge' && (sel.source === name || sel.destination === name);
      g.classList.toggle('selected', isSel);
      g.classList.toggle('lit', isEnd);
      g.setAttribute('aria-pressed', String(isSel));
    }
    graph.svg.classList.toggle('focus-mode', !!(sel || hov));
    for (const tr of document.querySelectorAll('#services tbody tr[data-service]')) {
      tr.classList.toggle('selected', !!sel && sel.kind === 'service' && sel.name === tr.dataset.service);
    }
  }

  // ---- selection and detail panel ---------------------------------------------------------
  function select(sel) {
    state.selected = sel;
    renderDetail();
    highlight();
    tick();
    // Bring the node into view inside the graph panel only; the page itself stays put.
    const g = sel && sel.kind === 'service' && graph.nodes.get(sel.name);
    const wrap = graph.svg.parentNode;
    if (!g) return;
    const [r, w] = [g.getBoundingClientRect(), wrap.getBoundingClientRect()];
    if (r.top < w.top || r.bottom > w.bottom) wrap.scrollTop += r.top - w.top - (w.height - r.height) / 2;
  }

  function metric(label, value, cls) {
    return h('div', { class: 'metric' }, h('dt', {}, label), h('dd', { class: cls || null }, value));
  }

  // A service without requests reports 0 s latencies; they mean "no data", not "instant".
  const latencyOf = (x) => (x.requests === 0 || !x.latency ? {} : x.latency);

  function goldenMetrics(x) {
    const lat = latencyOf(x);
    return h('dl', { class: 'metrics' },
      metric('requests/s', fmtRps(x.rps)),
      metric('success', fmtPct(x.success_rate), `rate ${rateClass(x.success_rate)}`),
      metric('requests', fmtInt(x.requests)),
      metric('p50', fmtMs(lat.p50)), metric('p95', fmtMs(lat.p95)), metric('p99', fmtMs(lat.p99)));
  }

  function edgeLink(e, focusKey) {
    return h('button', {
      type: 'button', class: 'link', 'data-focus-key': focusKey,
      onclick: () => select({ kind: 'edge', source: e.source, destination: e.destination }),
    }, `${e.source} → ${e.destination}`, h('span', { class: 'muted' }, ` ${fmtRps(e.rps)} rps · `), rateText(e.success_rate));
  }

  function renderDetail() {
    const { model, selected: sel } = state;
    const [svcPanel, edgePanel] = [$('service-detail'), $('edge-detail')];
    svcPanel.hidden = !sel || sel.kind !== 'service';
    edgePanel.hidden = !sel || sel.kind !== 'edge';
    $('detail-empty').hidden = !!sel;
    if (!sel || !model) return;
    if (sel.kind === 'service') rebuild(svcPanel, () => serviceDetail(model, sel.name));
    else rebuild(edgePanel, () => edgeDetail(model, sel.source, sel.destination));
  }

  function closeButton() {
    return h('button', { type: 'button', class: 'close', 'aria-label': 'close details', 'data-focus-key': 'close', onclick: () => select(null) }, '×');
  }

  function serviceDetail(model, name) {
    const svc = model.services.get(name);
    const head = h('div', { class: 'detail-head' }, h('h2', {}, name), closeButton());
    if (!svc) return [head, h('p', { class: 'empty' }, 'This service is not in the current snapshot.')];
    const down = svc.registered && !svc.healthy_instances;
    const tags = h('p', { class: 'tags' },
      svc.registered ? badge(down ? 'down' : 'registered', down ? 'bad' : 'ok') : badge('not registered', 'idle'),
      svc.registered ? h('span', { class: 'muted' }, ` ${svc.healthy_instances}/${svc.instances} instances healthy`) : null);
    const parts = [head, tags, goldenMetrics(svc)];
    if (!svc.registered) {
      parts.push(h('p', { class: 'muted' }, 'A caller or host seen in traffic that is not registered with the mesh.'));
    } else {
      parts.push(h('h3', {}, 'Instances'), instanceTable(svc.members || []));
    }
    const callers = model.edges.filter((e) => e.destination === name);
    const callees = model.edges.filter((e) => e.source === name);
    if (callers.length) parts.push(h('h3', {}, 'Called by'), h('ul', { class: 'links' }, callers.map((e) => h('li', {}, edgeLink(e, `in:${e.source}`)))));
    if (callees.length) parts.push(h('h3', {}, 'Calls'), h('ul', { class: 'links' }, callees.map((e) => h('li', {}, edgeLink(e, `out:${e.destination}`)))));
    return parts;
  }

  function instanceTable(members) {
    if (!members.length) return h('p', { class: 'empty' }, 'No instances registered.');
    const at = state.snap.generated_at;
    // Two lines per cell, so seven fields fit the narrow panel.
    const rows = members.slice().sort((a, b) => String(a.id).localeCompare(String(b.id))).map((m) => h('tr', {},
      h('td', {}, h('div', { class: 'mono strong' }, m.id), h('div', { class: 'mono muted' }, `${m.address}:${m.port}`)),
      h('td', {}, m.healthy ? badge('healthy', 'ok') : badge('unhealthy', 'bad'),
        h('div', { class: 'muted' }, `${m.version || '—'} · ${m.zone || '—'}`)),
      // Stored as registry-clock instants so the 1 s ticker can count without the network.
      h('td', { class: 'num' },
        h('div', { 'data-since': isNum(m.lease_age) ? at - m.lease_age : null, 'data-prefix': 'renewed ' }),
        h('div', { class: 'muted', 'data-until': isNum(m.expires_in) ? at + m.expires_in : null, 'data-prefix': 'expires ' }))));
    return h('table', { class: 'instances' },
      h('thead', {}, h('tr', {}, ['instance', 'health', 'lease'].map((x) => h('th', {}, x)))),
      h('tbody', {}, rows));
  }

  function edgeDetail(model, source, destination) {
    const e = model.edgeMap.get(edgeKey(source, destination));
    const head = h('div', { class: 'detail-head' }, h('h2', {}, `${source} → ${destination}`), closeButton());
    if (!e) return [head, h('p', { class: 'empty' }, 'No traffic on this edge in the current snapshot.')];
    const counts = Object.entries(e.counts || {}).filter(([, n]) => n > 0)
      .sort(([a], [b]) => a.localeCompare(b))
      .map(([k, n]) => h('li', { class: `count c${k}` }, h('span', {}, k), ` ${fmtInt(n)}`));
    const faults = e.faults || {};
    return [
      head,
      h('p', { class: 'tags' },
        h('button', { type: 'button', class: 'link', 'data-focus-key': 'src', onclick: () => select({ kind: 'service', name: source }) }, source),
        h('span', { class: 'muted' }, ' → '),
        h('button', { type: 'button', class: 'link', 'data-focus-key': 'dst', onclick: () => select({ kind: 'service', name: destination }) }, destination)),
      goldenMetrics(e),
      h('h3', {}, 'Responses'),
      counts.length ? h('ul', { class: 'counts-list' }, counts) : h('p', { class: 'empty' }, 'No responses in the window.'),
      h('dl', { class: 'metrics three' },
        metric('aborts injected', fmtInt(faults.abort || 0), faults.abort ? 'rate bad' : null),
        metric('delays injected', fmtInt(faults.delay || 0), faults.delay ? 'rate warn' : null),
        metric('retries', fmtInt(e.retries || 0), e.retries ? 'rate warn' : null)),
      h('h3', {}, 'Latency and success, last 5 minutes'),
      latencyChart(e.series),
      h('ul', { class: 'chart-legend' },
        h('li', {}, h('span', { class: 'swatch p50' }), 'p50'),
        h('li', {}, h('span', { class: 'swatch p99' }), 'p99'),
        h('li', {}, h('span', { class: 'swatch ok' }), 'success per 10 s')),
    ];
  }

  function niceCeil(v) {
    if (!(v > 0)) return 1;
    const pow = 10 ** Math.floor(Math.log10(v));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * pow >= v) return m * pow;
    return 10 * pow;
  }

  function latencyChart(series) {
    const W = 360, H = 178, L = 50, R = 10, T = 10, LAT_H = 96, SR_T = 128, SR_H = 24;
    const plotW = W - L - R;
    const chart = s('svg', { class: 'latency-chart', viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': 'p50 and p99 latency and success rate over time' });
    const n = series && Array.isArray(series.rps) ? series.rps.length : 0;
    const empty = s('text', { class: 'axis', x: W / 2, y: H / 2, 'text-anchor': 'middle' }, 'no data yet');
    if (!n) { chart.append(empty); return chart; }
    const step = series.step || 10;
    const end = series.start + n * step;
    const span = Math.max(300, n * step);
    const xOf = (i) => L + ((series.start + (i + 0.5) * step - (end - span)) / span) * plotW;
    const [p50, p99, sr] = [series.p50 || [], series.p99 || [], series.success_rate || []];
    const maxMs = niceCeil(Math.max(0, ...p99.filter(isNum), ...p50.filter(isNum)) * 1000);
    const yOf = (sec) => T + LAT_H - ((sec * 1000) / maxMs) * LAT_H;
    for (const frac of [0, 0.5, 1]) {
      const y = T + LAT_H - frac * LAT_H;
      chart.append(s('line', { class: 'grid', x1: L, x2: W - R, y1: y, y2: y }),
        s('text', { class: 'axis', x: L - 6, y: y + 4, 'text-anchor': 'end' }, frac ? fmtMs((maxMs * frac) / 1000) : '0'));
    }
    // One path per series; a null bucket starts a new subpath, so it shows as a gap.
    const path = (values, cls) => {
      let [d, open] = ['', false];
      values.forEach((v, i) => {
        if (!isNum(v)) { open = false; return; }
        const next = isNum(values[i + 1]);
        d += `${open ? 'L' : 'M'}${xOf(i).toFixed(1)},${yOf(v).toFixed(1)}`;
        if (!open && !next) d += 'h0.01'; // a lone point still shows as a dot (round caps)
        open = true;
      });
      if (d) chart.append(s('path', { class: `series ${cls}`, d, fill: 'none' }));
    };
    path(p50, 'p50');
    path(p99, 'p99');

    const lo = Math.min(0.9, Math.floor(Math.min(1, ...sr.filter(isNum)) * 10) / 10);
    const barW = Math.max(1, plotW / Math.max(n, span / step) - 1.5);
    chart.append(s('line', { class: 'grid', x1: L, x2: W - R, y1: SR_T + SR_H, y2: SR_T + SR_H }),
      s('text', { class: 'axis', x: L - 6, y: SR_T + 8, 'text-anchor': 'end' }, '100%'),
      s('text', { class: 'axis', x: L - 6, y: SR_T + SR_H + 2, 'text-anchor': 'end' }, `${Math.round(lo * 100)}%`));
    for (let i = 0; i < n; i += 1) {
      const when = -Math.round(end - (series.start + (i + 1) * step));
      const tip = s('rect', { class: 'tip', x: (xOf(i) - barW / 2).toFixed(1), y: T, width: barW.toFixed(1), height: SR_T + SR_H - T });
      tip.append(s('title', {}, `${when ? `${fmtSpan(-when)} ago` : 'now'}: ${fmtRps(series.rps[i])} rps, success ${fmtPct(sr[i])}, p50 ${fmtMs(p50[i])}, p99 ${fmtMs(p99[i])}`));
      if (isNum(sr[i])) {
        const frac = Math.max(0.08, Math.min(1, (sr[i] - lo) / (1 - lo || 1)));
        chart.append(s('rect', {
          class: 'bar', x: (xOf(i) - barW / 2).toFixed(1), y: (SR_T + SR_H * (1 - frac)).toFixed(1),
          width: barW.toFixed(1), height: (SR_H * frac).toFixed(1), fill: COLORS[rateClass(sr[i])],
        }));
      }
      chart.append(tip);
    }
    chart.append(
      s('text', { class: 'axis', x: L, y: H - 4 }, `${fmtSpan(span)} ago`),
      s('text', { class: 'axis', x: L + plotW / 2, y: H - 4, 'text-anchor': 'middle' }, `${+(span / 120).toFixed(1)} min ago`),
      s('text', { class: 'axis', x: W - R, y: H - 4, 'text-anchor': 'end' }, 'now'));
    return chart;
  }

  // ---- header and tables ------------------------------------------------------------------
  function renderHeader(snap, model) {
    const registered = [...model.services.values()].filter((x) => x.registered);
    const healthy = registered.reduce((a, x) => a + (x.healthy_instances || 0), 0);
    const total = registered.reduce((a, x) => a + (x.instances || 0), 0);
    const rps = registered.reduce((a, x) => a + (x.rps || 0), 0);
    $('count-services').textContent = String(registered.length);
    $('count-instances').textContent = `${healthy}/${total}`;
    $('count-instances').className = healthy < total ? 'rate warn' : '';
    $('count-rps').textContent = fmtRps(rps);
    const covered = snap.covered_seconds;
    $('count-window').textContent = `last ${fmtSpan(snap.window_seconds)}` +
      (isNum(covered) && covered < snap.window_seconds ? ` (${fmtSpan(covered)} seen)` : '');
  }

  const emptyRow = (cols, text) => h('tr', { class: 'empty-row' }, h('td', { colspan: cols, class: 'empty' }, text));

  function renderDenials(snap) {
    const tbody = $('denials').tBodies[0];
    const rows = (snap.denials || []).map((d) => h('tr', { 'data-rule': d.rule || '' },
      h('td', { class: 'num nowrap', 'data-since': d.at }, ''),
      h('td', {}, `${d.source} → ${d.destination}`),
      h('td', { class: 'mono' }, `${d.method} ${d.path}`),
      h('td', { class: 'num' }, badge(String(d.status), d.status === 403 ? 'bad' : 'warn')),
      h('td', {}, d.rule ? `${d.rule}${isNum(d.line) ? ` (line ${d.line})` : ''}` : h('span', { class: 'muted' }, 'default')),
      h('td', { class: 'reason' }, d.reason || '')));
    rebuild(tbody, () => (rows.length ? rows : emptyRow(6, 'no denials in the last minutes')));
  }

  function renderFaults(model) {
    const tbody = $('faults').tBodies[0];
    const rows = model.edges
      .filter((e) => (e.faults && (e.faults.abort || e.faults.delay)) || e.retries)
      .sort((a, b) => a.source.localeCompare(b.source) || a.destination.localeCompare(b.destination))
      .map((e) => h('tr', {
        class: 'clickable', tabindex: 0, 'data-source': e.source, 'data-destination': e.destination,
        'data-focus-key': edgeKey(e.source, e.destination),
        ...onActivate(() => select({ kind: 'edge', source: e.source, destination: e.destination })),
      },
      h('td', {}, `${e.source} → ${e.destination}`),
      h('td', { class: 'num' }, fmtInt(e.faults.abort || 0)),
      h('td', { class: 'num' }, fmtInt(e.faults.delay || 0)),
      h('td', { class: 'num' }, fmtInt(e.retries || 0))));
    rebuild(tbody, () => (rows.length ? rows : emptyRow(4, 'no injected faults and no retries in the window')));
  }

  function renderServices(model) {
    const tbody = $('services').tBodies[0];
    const uniq = (list) => [...new Set(list.filter(Boolean))].sort().join(', ') || '—';
    const rows = model.names.map((name) => {
      const svc = model.services.get(name);
      const members = svc.members || [];
      const down = svc.registered && !svc.healthy_instances;
      return h('tr', {
        class: `clickable${svc.registered ? '' : ' external'}${down ? ' down' : ''}`, tabindex: 0,
        'data-service': name, 'data-focus-key': name,
        ...onActivate(() => select({ kind: 'service', name })),
      },
      h('td', {}, name, svc.registered ? (down ? [' ', badge('down', 'bad')] : null) : [' ', badge('not registered', 'idle')]),
      h('td', { class: 'num' }, svc.registered ? `${svc.healthy_instances}/${svc.instances}` : '—'),
      h('td', {}, uniq(members.map((m) => m.version))),
      h('td', {}, uniq(members.map((m) => m.zone))),
      h('td', { class: 'num' }, fmtRps(svc.rps)),
      h('td', { class: 'num' }, rateText(svc.success_rate)),
      h('td', { class: 'num' }, fmtMs(latencyOf(svc).p99)));
    });
    rebuild(tbody, () => (rows.length ? rows : emptyRow(7, 'no services yet')));
  }

  // ---- ticking clocks (local only) --------------------------------------------------------
  function tick() {
    const now = registryNow();
    for (const el of document.querySelectorAll('[data-since]')) {
      el.textContent = `${el.dataset.prefix || ''}${fmtSpan(now - Number(el.dataset.since))} ago`;
    }
    for (const el of document.querySelectorAll('[data-until]')) {
      const left = Number(el.dataset.until) - now;
      el.textContent = left > 0 ? `${el.dataset.prefix || ''}in ${fmtSpan(left)}` : 'expired';
      el.classList.toggle('expired', left <= 0);
    }
    renderStatus();
  }

  function renderStatus() {
    const el = $('status');
    el.dataset.state = state.conn;
    const age = state.snap ? ` · updated ${fmtSpan((Date.now() - state.receivedAt) / 1000)} ago` : '';
    const words = { connecting: 'connecting…', live: 'live', reconnecting: 'reconnecting…', offline: 'offline' };
    el.textContent = state.conn === 'connecting' ? words.connecting : words[state.conn] + age;
  }

  // ---- data -------------------------------------------------------------------------------
  function accept(snap) {
    if (!snap || !Array.isArray(snap.services)) return;
    state.snap = snap;
    state.receivedAt = Date.now();
    state.model = buildModel(snap);
    renderHeader(snap, state.model);
    renderGraph(state.model);
    renderDenials(snap);
    renderFaults(state.model);
    renderServices(state.model);
    renderDetail();
    tick();
  }

  const setConn = (conn) => { state.conn = conn; renderStatus(); };

  function connect() {
    clearTimeout(state.retryTimer);
    state.retryTimer = 0;
    if (state.es || document.visibilityState === 'hidden') return;
    const es = new EventSource('api/events');
    state.es = es;
    es.addEventListener('open', () => { if (state.snap) setConn('live'); });
    es.addEventListener('state', (ev) => {
      let snap;
      try { snap = JSON.parse(ev.data); } catch { return; }
      setConn('live');
      accept(snap);
    });
    es.addEventListener('error', () => {
      if (state.es !== es) return;
      // CONNECTING: the browser retries by itself (the server asked for 5 s).
      if (es.readyState !== EventSource.CLOSED) { setConn('reconnecting'); return; }
      es.close();
      state.es = null;
      checkSession();
    });
  }

  const disconnect = () => { if (state.es) { state.es.close(); state.es = null; } };

  // The stream was refused for good (401 after the cookie expired, a 503 when too many pages
  // watch, the registry gone): one plain request tells which, then wait before trying again.
  async function checkSession() {
    setConn('reconnecting');
    state.retryAllowedAt = Date.now() + RECONNECT_MS;
    try {
      const res = await fetch('api/state', { cache: 'no-store', credentials: 'same-origin', headers: { Accept: 'application/json' } });
      if (res.status === 401) { window.location.assign('login'); return; }
      if (res.ok) accept(await res.json());
      else setConn('offline');
    } catch {
      setConn('offline');
    }
    scheduleConnect();
  }

  function scheduleConnect() {
    clearTimeout(state.retryTimer);
    if (document.visibilityState === 'hidden') return;
    state.retryTimer = setTimeout(connect, Math.max(0, state.retryAllowedAt - Date.now()));
  }

  function onVisibility() {
    if (document.visibilityState === 'hidden') {
      disconnect();
      clearTimeout(state.retryTimer);
      state.retryTimer = 0;
    } else if (!state.es) {
      if (state.conn === 'live') setConn('connecting');
      scheduleConnect(); // immediately, unless a refused stream asked us to wait
    }
  }

  function init() {
    initGraph();
    document.addEventListener('keydown', (ev) => { if (ev.key === 'Escape' && state.selected) select(null); });
    document.addEventListener('visibilitychange', onVisibility);
    setInterval(() => { if (document.visibilityState === 'visible') tick(); }, 1000);
    renderStatus();
    connect();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();
