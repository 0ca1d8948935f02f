"""Application Settings → HPCSeg: the widgets of the page; what it shows and does is ``HPCSegLib.settingspage``.

A ``ctkSettingsPanel`` as ExtensionWizard's SettingsPanel is, added to the settings dialog on ``startupCompleted``
and held by the module object. Two Slicer settings (``registerProperty``, kept in Slicer's settings file): where
pip installs hpcseg from, and the worker's Python. The profile fields are hpcseg's own config file, through the
page logic. The page redraws itself whenever it is shown (an event filter, as SampleData uses one) and when the
module has just installed hpcseg, so it enables itself without a restart. Site presets and Test connection go
through a short-lived worker (the page's timer pumps it), never blocking Slicer on SSH.
"""

from __future__ import annotations

import ctk
import qt
from HPCSegLib.settingspage import SettingsPageLogic

SETTINGS_SOURCE = "HPCSeg/InstallSource"
SETTINGS_PYTHON = "HPCSeg/WorkerPython"


class _ShowFilter(qt.QObject):
    """Calls back when the watched widget is shown."""

    def __init__(self, callback):
        qt.QObject.__init__(self)
        self.callback = callback

    def eventFilter(self, obj, event):
        if event.type() == qt.QEvent.Show:
            self.callback()
        return False


class HPCSegSettingsPanel(ctk.ctkSettingsPanel):
    def __init__(self, *args, **kwargs):
        ctk.ctkSettingsPanel.__init__(self, *args, **kwargs)
        self.logic = SettingsPageLogic()
        self.editors = {}
        layout = qt.QFormLayout(self)
        self.sourceEdit = qt.QLineEdit()
        self.sourceEdit.placeholderText = "automatic: this plugin's hpcseg checkout, else the package index"
        self.sourceEdit.toolTip = "A requirement (hpcseg==0.1.0), a wheel file, a source folder or a URL"
        layout.addRow("Install hpcseg from:", self.sourceEdit)
        self.registerProperty(SETTINGS_SOURCE, self.sourceEdit, "text", str(qt.SIGNAL("textChanged(QString)")),
                              "Where pip installs hpcseg from")
        self.pythonEdit = qt.QLineEdit()
        self.pythonEdit.placeholderText = "automatic: Slicer's PythonSlicer"
        self.pythonEdit.toolTip = "The Python that runs the hpcseg worker (it must have hpcseg installed)"
        layout.addRow("Worker Python:", self.pythonEdit)
        self.registerProperty(SETTINGS_PYTHON, self.pythonEdit, "text", str(qt.SIGNAL("textChanged(QString)")),
                              "The Python that runs the hpcseg worker")

        self.profileBox = qt.QComboBox()
        self.profileBox.editable = True  # type a new name to make a profile
        self.profileBox.toolTip = "Pick a profile to edit, or type a new name and press Load"
        self.loadButton = qt.QPushButton("Load")
        self.loadButton.connect("clicked(bool)", self.onLoad)
        row = qt.QHBoxLayout()
        row.addWidget(self.profileBox, 1)
        row.addWidget(self.loadButton)
        layout.addRow("Profile:", row)
        self.presetBox = qt.QComboBox()
        self.presetBox.toolTip = "The site's presets (from its hpcseg site bundle on the cluster)"
        self.presetBox.connect("activated(int)", self.onPresetPicked)
        self.presetButton = qt.QPushButton("Ask the site")
        self.presetButton.toolTip = "Read the site bundle's presets over this profile's SSH connection"
        self.presetButton.connect("clicked(bool)", self.onAskPresets)
        presetRow = qt.QHBoxLayout()
        presetRow.addWidget(self.presetBox, 1)
        presetRow.addWidget(self.presetButton)
        layout.addRow("Site preset:", presetRow)
        self.presetTimer = qt.QTimer()
        self.presetTimer.setInterval(50)
        self.presetTimer.connect("timeout()", self.onPresetTick)
        self.fields = qt.QGroupBox("Profile (saved in hpcseg's config file, shared with the hpcseg command)")
        self.fieldsLayout = qt.QFormLayout(self.fields)
        layout.addRow(self.fields)
        self.defaultCheck = qt.QCheckBox("Make it the default profile")
        self.saveButton = qt.QPushButton("Save profile")
        self.saveButton.connect("clicked(bool)", self.onSave)
        layout.addRow(self.defaultCheck, self.saveButton)
        self.testButton = qt.QPushButton("Test connection")
        self.testButton.toolTip = "hpcseg doctor for this profile (as saved): one line per check, or what to fix"
        self.testButton.connect("clicked(bool)", self.onTest)
        layout.addRow(self.testButton)
        self.message = qt.QLabel()
        self.message.wordWrap = True
        layout.addRow(self.message)
        self.showFilter = _ShowFilter(self.refresh)
        self.installEventFilter(self.showFilter)
        self.refresh()

    # --- the logic's answers, drawn -------------------------------------------------------------------------
    def refresh(self):
        """Look again (hpcseg installed now? profiles added at the command line?) and redraw."""
        self.draw(self.logic.refresh())

    def onLoad(self, *args):
        self.draw(self.logic.load(self.profileBox.currentText))

    def onSave(self, *args):
        values = {key: (e.currentText if isinstance(e, qt.QComboBox) else e.text) for key, e in self.editors.items()}
        self.draw(self.logic.save(self.profileBox.currentText, values, self.defaultCheck.checked))

    def onAskPresets(self, *args):
        self.logic.worker_python = qt.QSettings().value(SETTINGS_PYTHON, "") or None
        self.draw(self.logic.request_presets(self.profileBox.currentText))
        if self.logic.busy:
            self.presetTimer.start()

    def onTest(self, *args):
        self.logic.worker_python = qt.QSettings().value(SETTINGS_PYTHON, "") or None
        self.draw(self.logic.request_test(self.profileBox.currentText))
        if self.logic.busy:
            self.presetTimer.start()

    def onPresetTick(self):
        state = self.logic.pump()
        if state is not None:
            self.presetTimer.stop()
            self.draw(state)

    def onPresetPicked(self, index):
        self.draw(self.logic.pick_preset(self.presetBox.itemData(index) or ""))

    def draw(self, state):
        for f in state.fields:
            if f.key not in self.editors:
                editor = qt.QComboBox() if f.choices else qt.QLineEdit()
                if f.choices:
                    editor.addItems(list(f.choices))
                else:
                    editor.placeholderText = f.help or "default"
                editor.toolTip = f.help
                self.fieldsLayout.addRow(f.label + ":", editor)
                self.editors[f.key] = editor
        for key, editor in self.editors.items():
            value = state.values.get(key, "")
            if isinstance(editor, qt.QComboBox):
                editor.currentIndex = max(0, editor.findText(value))
            else:
                editor.text = value
        if state.profiles:
            self.profileBox.blockSignals(True)
            self.profileBox.clear()
            self.profileBox.addItems(state.profiles)
            self.profileBox.blockSignals(False)
            self.profileBox.setEditText(state.current)
        self.presetBox.clear()
        self.presetBox.addItem("(none)", "")
        for row in state.presets:
            label = row["name"] + (f": {row['description']}" if row.get("description") else "")
            self.presetBox.addItem(label + (" (refused)" if row.get("refusal") else ""), row["name"])
        self.presetBox.currentIndex = max(0, self.presetBox.findData(state.values.get("preset", "")))
        for w in (self.fields, self.profileBox, self.loadButton, self.saveButton, self.defaultCheck,
                  self.presetBox):
            w.enabled = state.enabled
        self.presetButton.enabled = self.testButton.enabled = state.enabled and not self.logic.busy
        self.message.text = state.message
        self.message.toolTip = "\n".join(f"{'ok ' if c['ok'] else 'FIX'}  {c['item']}: {c['detail']}"
                                         for c in state.checks)
        self.message.setStyleSheet("color: #c62828" if state.error else "")
