// Pan (drag), zoom (wheel, buttons) and hover for the maps; no libraries, nothing fetched.
(function () {
  var tip = document.getElementById("fm-tip");
  document.querySelectorAll("svg.fm-map").forEach(function (svg) {
    var vb = svg.viewBox.baseVal;
    var home = [vb.x, vb.y, vb.width, vb.height];
    var drag = null;
    function set(v) { svg.setAttribute("viewBox", v.join(" ")); }
    function at(e) {
      var r = svg.getBoundingClientRect();
      return [vb.x + (e.clientX - r.left) / r.width * vb.width,
              vb.y + (e.clientY - r.top) / r.height * vb.height];
    }
    function zoom(f, c) {
      var w = vb.width * f, h = vb.height * f;
      if (w >= home[2]) { set(home); return; }
      set([c[0] - (c[0] - vb.x) * f, c[1] - (c[1] - vb.y) * f, w, h]);
    }
    svg.addEventListener("wheel", function (e) {
      e.preventDefault();
      zoom(e.deltaY < 0 ? 0.8 : 1.25, at(e));
    }, {passive: false});
    svg.addEventListener("mousedown", function (e) {
      drag = [e.clientX, e.clientY, vb.x, vb.y];
      svg.style.cursor = "grabbing";
    });
    window.addEventListener("mousemove", function (e) {
      if (!drag) { return; }
      var r = svg.getBoundingClientRect();
      set([drag[2] - (e.clientX - drag[0]) / r.width * vb.width,
           drag[3] - (e.clientY - drag[1]) / r.height * vb.height, vb.width, vb.height]);
    });
    window.addEventListener("mouseup", function () { drag = null; svg.style.cursor = ""; });
    svg.closest(".fm-mapbox").querySelectorAll("button[data-zoom]").forEach(function (b) {
      b.addEventListener("click", function () {
        var z = b.getAttribute("data-zoom");
        if (z === "reset") { set(home); return; }
        zoom(z === "in" ? 0.7 : 1 / 0.7, [vb.x + vb.width / 2, vb.y + vb.height / 2]);
      });
    });
    svg.addEventListener("mousemove", function (e) {
      var t = e.target.closest ? e.target.closest("[data-tip]") : null;
      if (!t || drag) { tip.style.display = "none"; return; }
      tip.textContent = t.getAttribute("data-tip");
      tip.style.display = "block";
      tip.style.left = (e.pageX + 14) + "px";
      tip.style.top = (e.pageY + 14) + "px";
    });
    svg.addEventListener("mouseleave", function () { tip.style.display = "none"; });
  });
  document.querySelectorAll("input[data-toggle]").forEach(function (box) {
    box.addEventListener("change", function () {
      document.querySelectorAll(box.getAttribute("data-toggle")).forEach(function (el) {
        el.style.display = box.checked ? "" : "none";
      });
    });
  });
})();
