// ControlNet Studio: what gradio cannot do by itself.
// A unit tab's title shows whether the unit is enabled ("ControlNet Unit 0 [on]"), so users see at a glance
// which units will run without opening each tab. Works in the WebUI and in the standalone app.
(function () {
    if (window.cnetStudioTabTitles) return;
    window.cnetStudioTabTitles = true;

    function syncTabTitles() {
        document.querySelectorAll(".cnet-unit-tabs").forEach(function (tabs) {
            var buttons = tabs.querySelectorAll(":scope > .tab-nav > button, :scope > div > button");
            var panels = tabs.querySelectorAll(":scope > .tabitem");
            panels.forEach(function (panel, i) {
                var button = buttons[i];
                var box = panel.querySelector(".cnet-unit-enabled input[type=checkbox]");
                if (!button || !box) return;
                var base = button.dataset.cnetTitle || button.textContent.replace(/\s*\[on\]$/, "").trim();
                button.dataset.cnetTitle = base;
                var wanted = box.checked ? base + " [on]" : base;
                if (button.textContent !== wanted) button.textContent = wanted;
                button.classList.toggle("cnet-unit-on", box.checked);
            });
        });
    }

    document.addEventListener("change", function (event) {
        if (event.target.closest && event.target.closest(".cnet-unit-enabled")) syncTabTitles();
    }, true);
    // Values pasted from infotext or set by the server do not fire DOM change events: watch the DOM too.
    // Coalesced to one pass per frame: the WebUI's page mutates constantly (progress bars, galleries).
    var pending = false;
    new MutationObserver(function () {
        if (pending) return;
        pending = true;
        window.requestAnimationFrame(function () { pending = false; syncTabTitles(); });
    })
        .observe(document.documentElement, {childList: true, subtree: true, attributes: true, attributeFilter: ["class"]});
    syncTabTitles();
})();
