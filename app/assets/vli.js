/* Browser-side callbacks of VL-InterpreT: no server round trip for token clicks and tinting. */
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
    /* Tint every clickable token by the selection's attention to it (ATT_STORE). */
    tint: function (att, tokenIds) {
      const n = tokenIds.length;
      const styles = new Array(n), titles = new Array(n);
      const sel = new Set((att && att.sel) || []);
      for (let k = 0; k < n; k++) {
        const i = tokenIds[k].index;
        const st = {};
        let title = 'click to show this token\'s attention';
        if (att && att.w && i < att.w.length) {
          const w = att.w[i];
          const a = att.max > 0 ? Math.min(1, w / att.max) : 0;
          /* Viridis-like ramp from pale yellow to deep blue-purple. */
          const r = Math.round(253 + (68 - 253) * a), g = Math.round(231 + (1 - 231) * a),
                b = Math.round(37 + (84 - 37) * a);
          st.backgroundColor = `rgba(${r},${g},${b},${0.15 + 0.85 * a})`;
          st.color = a > 0.55 ? '#fff' : null;
          title = `attention ${w.toFixed(4)}`;
        }
        if (sel.has(i)) { st.outline = '2px solid #d62728'; st.outlineOffset = '1px'; }
        styles[k] = st;
        titles[k] = title;
      }
      return [styles, titles];
    }
  }
});
