/* Browser-side callbacks of VL-InterpreT: no server round trip for token clicks and tinting. */

/* The colour of value a (0..1) on a plotly colour scale [[position, '#rrggbb'], ...]: [r, g, b]. */
function vliScaleColor(scale, a) {
  const rgb = hex => [1, 3, 5].map(k => parseInt(hex.slice(k, k + 2), 16));
  let k = 1;
  while (k < scale.length - 1 && scale[k][0] < a) { k++; }
  const [p0, c0] = scale[k - 1], [p1, c1] = scale[k];
  const t = p1 > p0 ? Math.min(1, Math.max(0, (a - p0) / (p1 - p0))) : 0;
  const lo = rgb(c0), hi = rgb(c1);
  return lo.map((v, j) => Math.round(v + (hi[j] - v) * t));
}

/* Black or white, whichever contrasts more with background [r, g, b] (WCAG relative luminance). */
function vliTextColor(rgb) {
  const lin = rgb.map(v => { const c = v / 255; return c <= 0.03928 ? c / 12.92 : Math.pow((c + 0.055) / 1.055, 2.4); });
  const lum = 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2];
  return (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) ? '#000' : '#fff';
}

window.dash_clientside = Object.assign({}, window.dash_clientside, {
  vli: {
    /* A token element was clicked: report its index (pattern-matching id) to the TOKEN_CLICK store. */
    tokenClick: function (clicks) {
      const cc = window.dash_clientside.callback_context;
      const trig = cc && cc.triggered && cc.triggered[0];
      if (!trig || !trig.value) { return window.dash_clientside.no_update; }
      const pid = trig.prop_id;
      const id = JSON.parse(pid.slice(0, pid.lastIndexOf('.')));
      return {index: id.index, t: Date.now()};
    },
    /* Tint every clickable token by the selection's attention (or rollout: att.name) to it (ATT_STORE)
       on the attention colour scale of the figures (ATT_SCALE), 0 .. att.max, with black or white text
       for contrast. */
    tint: function (att, tokenIds, scale) {
      const n = tokenIds.length;
      const styles = new Array(n), titles = new Array(n);
      const sel = new Set((att && att.sel) || []);
      for (let k = 0; k < n; k++) {
        const i = tokenIds[k].index;
        const st = {};
        let title = 'click to show this token\'s attention';
        if (att && att.w && i < att.w.length && scale) {
          const w = att.w[i];
          const a = att.max > 0 ? Math.min(1, Math.max(0, w / att.max)) : 0;
          const rgb = vliScaleColor(scale, a);
          st.backgroundColor = `rgb(${rgb[0]},${rgb[1]},${rgb[2]})`;
          st.color = vliTextColor(rgb);
          title = `${att.name || 'attention'} ${w.toFixed(4)}`;
        }
        if (sel.has(i)) { st.outline = '2px solid #d62728'; st.outlineOffset = '1px'; }
        styles[k] = st;
        titles[k] = title;
      }
      return [styles, titles];
    }
  }
});

/* Slider tooltips (dcc.Slider tooltip.transform): the layer slider names layer 0 "emb", as its marks do. */
window.dccFunctions = Object.assign({}, window.dccFunctions, {
  vliLayerLabel: function (value) { return value === 0 ? 'emb' : String(value); }
});

/* Enter in a slider's number box commits the value (dcc.Slider commits it only when the box loses focus). */
document.addEventListener('keydown', function (e) {
  const box = e.target;
  if (e.key === 'Enter' && box && box.matches && box.matches('.dash-slider-container input[type="number"]')) {
    box.blur();
  }
});

/* PNG / SVG downloads of a graph (the buttons of app.panels.common.image_downloads): plotly's own
   export, at 3x for a paper-ready PNG. */
window.dash_clientside.vli.downloadImage = function () {
  const cc = window.dash_clientside.callback_context;
  const trig = cc && cc.triggered && cc.triggered[0];
  if (!trig || !trig.value) { return window.dash_clientside.no_update; }
  const id = JSON.parse(trig.prop_id.slice(0, trig.prop_id.lastIndexOf('.')));
  const graph = document.getElementById(id.graph);
  const plot = graph && graph.querySelector('.js-plotly-plot');
  if (plot) {
    window.Plotly.downloadImage(plot, {format: id.format, filename: id.graph, scale: id.format === 'png' ? 3 : 1});
  }
  return Date.now();
};
