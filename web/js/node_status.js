// FantasyTalking nodes report what they found (frame count, face status, identity scores, warnings) as a "text"
// UI output. ComfyUI's front end keeps that in the history but draws nothing, so this shows it on the node, in a
// read-only text box under the widgets. It is not part of the workflow: it is not saved with it.
import { app } from "../../../scripts/app.js";
import { ComfyWidgets } from "../../../scripts/widgets.js";

const STATUS = "fantasytalking_status";

app.registerExtension({
  name: "FantasyTalking.NodeStatus",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.name.startsWith("FantasyTalking")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (!text || !text.length) return;
      let widget = this.widgets?.find((w) => w.name === STATUS);
      if (!widget) {
        widget = ComfyWidgets.STRING(this, STATUS, ["STRING", { multiline: true }], app).widget;
        widget.serialize = false; // not saved with the workflow
        widget.options = { ...widget.options, serialize: false }; // nor sent with the prompt (else a new cache key)
        if (widget.inputEl) {
          widget.inputEl.readOnly = true;
          widget.inputEl.style.opacity = 0.85;
        }
      }
      widget.value = Array.isArray(text) ? text.join("\n") : String(text);
      const [width, height] = this.computeSize();
      this.setSize([Math.max(width, this.size[0]), Math.max(height, this.size[1])]);
      app.graph.setDirtyCanvas(true, true);
    };
  },
});
