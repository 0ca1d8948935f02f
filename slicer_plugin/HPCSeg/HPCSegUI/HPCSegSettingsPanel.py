"""Application Settings → HPCSeg: where pip gets hpcseg, and the profiles of hpcseg's own config file.

A ``ctkSettingsPanel`` as ExtensionWizard's SettingsPanel is, added to the settings dialog on ``startupCompleted``.
The install source is a Slicer setting (``registerProperty``, kept in Slicer's settings file). The profile fields
are not: they are read from and written to hpcseg's TOML config file through ``HPCSegLib.profiles`` (hpcseg.config),
the same file the ``hpcseg`` command uses, so a profile made here works at the command line and the reverse.
"""

from __future__ import annotations

import ctk
import qt

SETTINGS_SOURCE = "HPCSeg/InstallSource"


class HPCSegSettingsPanel(ctk.ctkSettingsPanel):
    def __init__(self, *args, **kwargs):
        ctk.ctkSettingsPanel.__init__(self, *args, **kwargs)
        self.editors = {}
        layout = qt.QFormLayout(self)
        self.sourceEdit = qt.QLineEdit()
        self.sourceEdit.placeholderText = "automatic: this plugin's hpcseg checkout, else the package index"
        self.sourceEdit.toolTip = "A requirement (hpcseg==0.1.0), a wheel file, a source folder or a URL"
        layout.addRow("Install hpcseg from:", self.sourceEdit)
        self.registerProperty(SETTINGS_SOURCE, self.sourceEdit, "text", str(qt.SIGNAL("textChanged(QString)")),
                              "Where pip installs hpcseg from")

        self.profileBox = qt.QComboBox()
        self.profileBox.editable = True  # type a new name to make a profile
        self.profileBox.toolTip = "Pick a profile to edit, or type a new name and press Load"
        loadButton = qt.QPushButton("Load")
        loadButton.connect("clicked(bool)", lambda *a: self.loadProfile())
        row = qt.QHBoxLayout()
        row.addWidget(self.profileBox, 1)
        row.addWidget(loadButton)
        layout.addRow("Profile:", row)
        self.fields = qt.QGroupBox("Profile (saved in hpcseg's config file, shared with the hpcseg command)")
        self.fieldsLayout = qt.QFormLayout(self.fields)
        layout.addRow(self.fields)
        self.defaultCheck = qt.QCheckBox("Make it the default profile")
        saveButton = qt.QPushButton("Save profile")
        saveButton.connect("clicked(bool)", lambda *a: self.saveProfile())
        layout.addRow(self.defaultCheck, saveButton)
        self.message = qt.QLabel()
        self.message.wordWrap = True
        layout.addRow(self.message)
        self.reload()

    def reload(self):
        """Fill the profile list and the form, if hpcseg is installed (the module installs it on first use)."""
        try:
            from HPCSegLib.profiles import form_fields, profile_names
        except ImportError:
            self.fields.enabled = False
            self.message.text = "hpcseg is not installed yet: open the HPCSeg module once, then reopen this page."
            return
        if not self.editors:
            for f in form_fields():
                editor = qt.QComboBox() if f.choices else qt.QLineEdit()
                if f.choices:
                    editor.addItems(list(f.choices))
                else:
                    editor.placeholderText = f.help or "default"
                editor.toolTip = f.help
                self.fieldsLayout.addRow(f.label + ":", editor)
                self.editors[f.key] = editor
        try:
            names, default = profile_names()
        except Exception as exc:  # a broken config file: say where and why, keep the page usable
            self._say(exc)
            return
        self.profileBox.clear()
        self.profileBox.addItems(names)
        self.profileBox.currentIndex = names.index(default) if default in names else 0
        self.fields.enabled = True
        self.loadProfile()

    def loadProfile(self):
        from HPCSegLib.profiles import ProfileForm

        try:
            form = ProfileForm.load(self.profileBox.currentText.strip() or "local")
        except Exception as exc:
            self._say(exc)
            return
        for key, editor in self.editors.items():
            if isinstance(editor, qt.QComboBox):
                editor.currentIndex = max(0, editor.findText(form.values.get(key, "")))
            else:
                editor.text = form.values.get(key, "")
        self._say(f"{form.name} from {form.path}")

    def saveProfile(self):
        from HPCSegLib.profiles import ProfileForm

        values = {key: (e.currentText if isinstance(e, qt.QComboBox) else e.text) for key, e in self.editors.items()}
        form = ProfileForm(self.profileBox.currentText.strip(), values)
        try:
            path = form.save(make_default=self.defaultCheck.checked)
        except Exception as exc:  # a wrong value: the message names the key and what is allowed
            self._say(exc)
            return
        self._say(f"saved profile {form.name} to {path}")

    def _say(self, what):
        """A line under the form: a message, or an error (red) with hpcseg's sentence and hint."""
        from HPCSegLib.tasks import error_text

        error = isinstance(what, BaseException)
        self.message.text = error_text(what)[0] if error else what
        self.message.setStyleSheet("color: #c62828" if error else "")
