"""HPCSeg: segment CT and MRI in 3D Slicer with a cluster's GPUs (a thin skin over the hpcseg package).

Module, Widget, Logic and Test in the shape of Slicer's scripted-module template. Nothing here waits and no
Python thread is started: Slicer keeps Python's lock on its main thread while Qt idles, so threads would crawl.
Long work (connect, segment, clicks, upload, status, stop) runs in an hpcseg *worker process* per profile
(``python -m hpcseg.worker``, started with Slicer's own PythonSlicer), driven by ``HPCSegLib.worker.WorkerClient``
from a ``QTimer``; images pass as files in a private folder. The Widget only wires widgets to those calls; the
Logic moves data between Slicer nodes and numpy. Behaviour lives in ``HPCSegLib`` (plain Python, covered by
pytest in ``tests/slicer_plugin/``, also the worker exactly as this module drives it) and in hpcseg itself.

Needs Slicer 5.10 or newer (Python 3.12); older Slicer is refused in one line with the version it needs.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

import ctk
import qt
import slicer
import vtk
from HPCSegLib import dependencies
from HPCSegLib.worker import WorkerClient, error_text, stack_segments
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

SETTINGS_SOURCE = "HPCSeg/InstallSource"  # where pip gets hpcseg (Application Settings → HPCSeg)
SETTINGS_PROFILE = "HPCSeg/Profile"
SETTINGS_PYTHON = "HPCSeg/WorkerPython"  # the worker's Python (empty: Slicer's PythonSlicer)
COLOURS = {"ok": "#2e7d32", "busy": "#e65100", "idle": "#666666", "error": "#c62828"}
POINT_LISTS = {"fg": ("HPCSeg foreground", (0.2, 0.8, 0.2)), "bg": ("HPCSeg background", (0.9, 0.2, 0.2)),
               "extreme": ("HPCSeg extreme points", (0.2, 0.5, 1.0))}
EXTREME_POINTS = 6
BUSY_TICK_MS, IDLE_TICK_MS = 10, 250


def slicerProblem():
    """One line refusing this Slicer when it is older than 5.10, else None."""
    return dependencies.slicer_problem(slicer.app.majorVersion, slicer.app.minorVersion)


class HPCSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "HPCSeg"
        self.parent.categories = ["Segmentation"]
        self.parent.contributors = ["hpcseg developers"]
        self.parent.helpText = """Segment the selected volume on an HPC cluster's GPU (Slurm/PBS over SSH, or a local
process), correct it interactively with foreground/background or extreme points, and upload the corrected pair to a
dataset for fine-tuning. Profiles are shared with the <code>hpcseg</code> command (Application Settings → HPCSeg).
Needs 3D Slicer 5.10 or newer."""
        self.parent.acknowledgementText = "Built on hpcseg; interactive protocol compatible with MONAI Label."
        self.settingsPanel = None  # held here, by the module object Slicer keeps, not by a lambda
        slicer.app.connect("startupCompleted()", self.registerSettingsPanel)

    def registerSettingsPanel(self):
        """Add the HPCSeg page to Application Settings, as ExtensionWizard does with its SettingsPanel."""
        if slicer.app.commandOptions().noMainWindow or slicerProblem():
            return
        from HPCSegUI.HPCSegSettingsPanel import HPCSegSettingsPanel

        global _settingsPanel
        self.settingsPanel = _settingsPanel = HPCSegSettingsPanel()
        slicer.app.settingsDialog().addPanel("HPCSeg", self.settingsPanel)


_settingsPanel = None  # the page, for a refresh right after an install (the module object holds it too)


class _Reported:
    """``with widget._reported(what):`` errors of GUI-thread work become a dialog; the widget carries on."""

    def __init__(self, widget, what):
        self.widget, self.what = widget, what

    def __enter__(self):
        return self

    def __exit__(self, excType, exc, tb):
        if exc is not None and isinstance(exc, Exception):
            self.widget._failed(self.what, exc)
            return True
        return False


class HPCSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.workers = {}  # profile name -> WorkerClient: one worker (one SSH connection) per profile
        self.points = {}
        self.entered = False
        self._nextPoll = 0
        self._rerun = None  # an interactive call asked for while another ran: run it when that one ends

    # --- layout -------------------------------------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = HPCSegLogic()
        problem = slicerProblem()
        if problem:  # Slicer < 5.10: say so, build nothing that could fail
            label = qt.QLabel(problem)
            label.wordWrap = True
            self.layout.addWidget(label)
            self.layout.addStretch(1)
            return
        form = self._section("Server")
        self.profileBox = qt.QComboBox()
        form.addRow("Profile:", self.profileBox)
        self.connectButton = self._button(form, "Connect / start server", self.onConnect)
        self.stopButton = self._button(form, "Stop server", self.onStop)
        self.statusLabel = qt.QLabel("not connected")
        self.statusLabel.wordWrap = True
        form.addRow("Status:", self.statusLabel)
        form = self._section("Segment")
        self.volumeSelector = self._nodeSelector(form, "Volume:", "vtkMRMLScalarVolumeNode")
        self.modelBox = self._combo(form, "Model:")
        self.segmentButton = self._button(form, "Segment", self.onSegment)
        form = self._section("Interactive (points)")
        self.labelEdit = qt.QLineEdit("object")
        form.addRow("Structure name:", self.labelEdit)
        self.clickModelBox = self._combo(form, "Click model:")
        self.placeWidgets = {"fg": self._placeWidget(form, "Foreground:"), "bg": self._placeWidget(form, "Background:")}
        self.extremeModelBox = self._combo(form, "Extreme-points model:")
        self.placeWidgets["extreme"] = self._placeWidget(form, "Extreme points (6):")
        form = self._section("Upload corrected pair")
        self.segmentationSelector = self._nodeSelector(form, "Segmentation:", "vtkMRMLSegmentationNode")
        self.datasetEdit = qt.QLineEdit()
        self.datasetEdit.placeholderText = "dataset name, e.g. liver"
        form.addRow("Dataset:", self.datasetEdit)
        self.splitBox = self._combo(form, "Split:")
        self.splitBox.addItems(["auto", "train", "val"])
        self.uploadButton = self._button(form, "Upload corrected pair", self.onUpload)
        self.layout.addStretch(1)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        slicer.app.connect("aboutToQuit()", self.quitWorkers)
        self.timer = qt.QTimer()
        self.timer.setInterval(IDLE_TICK_MS)
        self.timer.connect("timeout()", self.onTick)
        if dependencies.importable():  # no install prompt here: only when hpcseg is first needed (Connect)
            self._loadProfiles()
        else:
            self.statusLabel.text = "hpcseg is not installed yet: Connect installs it"
        self.profileBox.connect("currentIndexChanged(int)", self.onProfileChanged)
        self._updateButtons()

    def _section(self, title):
        box = ctk.ctkCollapsibleButton()
        box.text = title
        self.layout.addWidget(box)
        return qt.QFormLayout(box)

    def _button(self, form, text, slot):
        button = qt.QPushButton(text)
        button.connect("clicked(bool)", lambda *a: slot())
        form.addRow(button)
        return button

    def _combo(self, form, label):
        box = qt.QComboBox()
        form.addRow(label, box)
        return box

    def _nodeSelector(self, form, label, nodeType):
        sel = slicer.qMRMLNodeComboBox()
        sel.nodeTypes = [nodeType]
        sel.addEnabled = sel.removeEnabled = sel.noneEnabled = False
        sel.setMRMLScene(slicer.mrmlScene)
        form.addRow(label, sel)
        return sel

    def _placeWidget(self, form, label):
        w = slicer.qSlicerMarkupsPlaceWidget()
        w.setMRMLScene(slicer.mrmlScene)
        w.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
        form.addRow(label, w)
        return w

    # --- life cycle ---------------------------------------------------------------------------------------------
    def enter(self):
        self.entered = True
        if slicerProblem():
            return
        if not self.points:
            self._bindPointLists()  # made when the module is shown, not in every new scene
        if not self.busy() and dependencies.importable():
            self._loadProfiles()  # pick up profiles added in Application Settings
        self._nextPoll = 0
        self.timer.start()

    def exit(self):
        self.entered = False
        for w in getattr(self, "placeWidgets", {}).values():
            w.setPlaceModeEnabled(False)
        if not self.busy():
            self.timer.stop()  # nothing to deliver and nobody looking: no ticks, no cluster polling

    def cleanup(self):
        self.quitWorkers()
        if hasattr(self, "timer"):
            self.timer.stop()
            slicer.app.disconnect("aboutToQuit()", self.quitWorkers)  # a reloaded widget is not kept alive
        self.removeObservers()

    def quitWorkers(self):
        """Slicer quits, the scene closes, the module reloads: every worker ends now (within 2 s each)."""
        workers, self.workers = self.workers, {}
        for worker in workers.values():
            worker.quit()

    def onSceneStartClose(self, caller, event):
        for w in self.placeWidgets.values():
            w.setPlaceModeEnabled(False)  # place mode must not outlive the scene
            w.setCurrentNode(None)
        for node in self.points.values():
            self.removeObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onPointsChanged)
            self.removeObserver(node, slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent, self.onPointsChanged)
        self.points = {}
        self._rerun = None
        self.quitWorkers()
        self.statusLabel.text = "scene closed: Connect again to use the server"
        self._clearModels()
        self._updateButtons()

    def onSceneEndClose(self, caller, event):
        if self.entered:
            self._bindPointLists()

    def onReload(self):
        """Developer mode → Reload: the helper packages too, not only this file."""
        self.quitWorkers()
        for name in sorted(sys.modules):
            if name.split(".")[0] in ("HPCSegLib", "HPCSegUI") and sys.modules[name] is not None:
                importlib.reload(sys.modules[name])
        ScriptedLoadableModuleWidget.onReload(self)

    def _bindPointLists(self):
        self.points = {key: self.logic.pointList(*spec) for key, spec in POINT_LISTS.items()}
        for key, node in self.points.items():
            self.placeWidgets[key].setCurrentNode(node)
            self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onPointsChanged)
            self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent, self.onPointsChanged)

    # --- the worker -----------------------------------------------------------------------------------------------
    @property
    def profile(self):
        return self.profileBox.currentText

    def worker(self):
        """The current profile's worker client (the process starts with its first call)."""
        name = self.profile
        if name not in self.workers:
            python = qt.QSettings().value(SETTINGS_PYTHON, "") or None
            self.workers[name] = WorkerClient(name, python=python, on_crash=self._workerCrashed)
        return self.workers[name]

    def busy(self, lane="action"):
        return any(w.busy(lane) for w in self.workers.values())

    def _workerCrashed(self, line):
        self.statusLabel.text = line
        self.statusLabel.setStyleSheet(f"color: {COLOURS['error']}")
        self._updateButtons()

    def _call(self, what, op, args=None, onDone=None, onProgress=None):
        """Send a call to the current profile's worker; errors come back as a dialog. False if one already runs."""
        profile = self.profile

        def done(result):
            self._updateButtons()
            if profile == self.profile and onDone is not None:  # a result for another profile is dropped
                with self._reported(what):
                    onDone(result)
            if self._rerun is not None:
                rerun, self._rerun = self._rerun, None
                rerun()

        def progress(msg):
            if profile == self.profile and onProgress is not None:
                onProgress(msg)

        try:
            callId = self.worker().call(op, args, on_done=done, on_error=lambda e: self._failed(what, e),
                                        on_progress=progress)
        except OSError as exc:  # the worker's Python cannot be started
            self._failed(what, ValueError(f"the hpcseg worker could not start ({exc}); check Application "
                                          "Settings → HPCSeg → Worker Python"))
            return False
        self.timer.setInterval(BUSY_TICK_MS)
        self.timer.start()
        self._updateButtons()
        return callId is not None

    def onTick(self):
        for worker in list(self.workers.values()):
            worker.pump()
        busy = self.busy(None)
        self.timer.setInterval(BUSY_TICK_MS if busy else IDLE_TICK_MS)
        worker = self.workers.get(self.profile) if hasattr(self, "profileBox") else None
        if (self.entered and worker is not None and worker.running and not worker.busy("poll")
                and time.monotonic() >= self._nextPoll):
            self._nextPoll = time.monotonic() + 60  # until the answer sets the real delay
            profile = self.profile
            worker.call("poll", on_done=lambda status: profile == self.profile and self._showStatus(status),
                        on_error=lambda exc: profile == self.profile and self._pollFailed(exc))
        if not busy and not self.entered:
            self.timer.stop()

    def _showStatus(self, status):
        self.statusLabel.text = status["text"]
        self.statusLabel.setStyleSheet(f"color: {COLOURS[status['severity']]}")
        self._nextPoll = time.monotonic() + status["delay"]
        self._updateButtons()

    def _pollFailed(self, exc):
        message, _details = error_text(exc)
        if message:
            self.statusLabel.text = f"status unknown: {message}"
        self._nextPoll = time.monotonic() + 10

    # --- state --------------------------------------------------------------------------------------------------
    def _reported(self, what):
        """``with self._reported(what):`` errors of GUI-thread work become a dialog with hpcseg's sentence and
        hint; the widget carries on."""
        return _Reported(self, what)

    def _loadProfiles(self):
        """The profile list as the config file has it now; the lists and status stay if the profile does."""
        from HPCSegLib.profiles import profile_names

        with self._reported("Reading hpcseg's config file"):
            names, default = profile_names()
            before = self.profile
            wanted = before or qt.QSettings().value(SETTINGS_PROFILE, default) or default
            self.profileBox.blockSignals(True)
            self.profileBox.clear()
            self.profileBox.addItems(names)
            self.profileBox.currentIndex = names.index(wanted if wanted in names else default)
            self.profileBox.blockSignals(False)
            if self.profile != before:
                self.onProfileChanged()

    def onProfileChanged(self, *args):
        qt.QSettings().setValue(SETTINGS_PROFILE, self.profile)
        self._rerun = None
        self._clearModels()
        worker = self.workers.get(self.profile)
        self.statusLabel.text = "not connected" if worker is None or not worker.running else "checking…"
        self.statusLabel.setStyleSheet("")
        self._nextPoll = 0
        self._updateButtons()

    def _clearModels(self):
        for box in (self.modelBox, self.clickModelBox, self.extremeModelBox):
            box.clear()

    def _updateButtons(self):
        busy = self.busy("action")
        hasModels = self.modelBox.count > 0 or self.clickModelBox.count > 0 or self.extremeModelBox.count > 0
        self.connectButton.enabled = not busy
        self.stopButton.enabled = bool(self.profile)
        self.segmentButton.enabled = hasModels and not busy
        self.uploadButton.enabled = bool(self.profile) and not busy

    def _showProgress(self, msg):
        """A worker's progress line: a sentence (connect), or a phase's done/total (segment, upload)."""
        if "message" in msg:
            self.statusLabel.text = msg["message"]
            return
        words = {"upload": "sending", "infer": "segmenting", "download": "receiving"}
        phase = words.get(msg.get("phase", ""), msg.get("phase", "uploading"))
        self.statusLabel.text = f"{phase}: {100 * msg['done'] // max(msg['total'], 1)} %"

    def _failed(self, what, exc):
        self._rerun = None
        self._updateButtons()
        message, details = error_text(exc)
        if not message:  # a call the user (or quitting) cancelled: nothing to say
            return
        kwargs = {"detailedText": details} if details else {}  # no "Show Details…" button with nothing in it
        slicer.util.errorDisplay(f"{what} failed: {message}", **kwargs)

    # --- actions ------------------------------------------------------------------------------------------------
    def onConnect(self):
        with self._reported("Installing hpcseg"):
            if not self.logic.ensureDependencies():
                return
            if self.profileBox.count == 0 or not self.workers.get(self.profile):
                self._loadProfiles()  # the profile as saved now: it may have been edited in Application Settings
            from HPCSegLib.profiles import load_profile

            profile = load_profile(self.profile)
            if dependencies.server_extras_needed(profile.scheduler, profile.python, self.worker().python):
                if not self.logic.ensureDependencies(server=True):
                    return
            self._nextPoll = 0
            self._call("Connecting", "connect", {}, onDone=self._showModels, onProgress=self._showProgress)

    def _showModels(self, result):
        from hpcseg.worker.session import CLICK_TYPES, EXTREME_TYPES, SEGMENTATION_TYPES

        models = result["models"]
        for box, kinds in ((self.modelBox, SEGMENTATION_TYPES), (self.clickModelBox, CLICK_TYPES),
                           (self.extremeModelBox, EXTREME_TYPES)):
            box.clear()
            box.addItems([m for kind in kinds for m in models.get(kind, [])])
        self._nextPoll = 0
        self._updateButtons()

    def onStop(self):
        def stopped(result):
            ids = result["job_ids"]
            self.statusLabel.text = f"stopped job {' '.join(ids)}" if ids else "no server job to stop"
            self._clearModels()

        self._call("Stopping the server", "stop", onDone=stopped)
        self._nextPoll = time.monotonic() + 2

    def _volumeSpec(self, volumeNode):
        array, matrix, key = self.logic.volumeArray(volumeNode)
        return self.worker().write_volume(array, matrix, key)

    def onSegment(self):
        volumeNode, model = self.volumeSelector.currentNode(), self.modelBox.currentText
        with self._reported("Segmentation"):
            spec = self._volumeSpec(volumeNode)
            worker = self.worker()

            def done(result):
                node = self.logic.showSegmentation(worker.read_labels(result), result["label_names"], volumeNode,
                                                   name=f"{volumeNode.GetName()} {model}")
                self._showResult(result, node)

            self._call("Segmentation", "segment", {"volume": spec, "model": model}, onDone=done,
                       onProgress=self._showProgress)

    def _showResult(self, result, segmentationNode):
        self.segmentationSelector.setCurrentNode(segmentationNode)
        warnings = result.get("warnings") or []
        note = f"; warnings: {'; '.join(warnings)}" if warnings else ""
        self.statusLabel.text = (f"{result['model']} {result['model_version']}: "
                                 f"{', '.join(result['label_names'])}{note}")

    def onPointsChanged(self, caller, event):
        volumeNode = self.volumeSelector.currentNode()
        if volumeNode is None or not self.points or self.clickModelBox.count + self.extremeModelBox.count == 0:
            return
        extreme = caller is self.points["extreme"]
        pts = {k: self.logic.pointsRAS(n) for k, n in self.points.items()}
        if (extreme and len(pts["extreme"]) < EXTREME_POINTS) or (not extreme and not pts["fg"]):
            return
        if self.busy("action"):  # one call at a time: this one is sent when the running one ends
            self._rerun = lambda: self.onPointsChanged(caller, event)
            return
        label = self.labelEdit.text.strip() or "object"
        with self._reported("Interactive segmentation"):
            spec = self._volumeSpec(volumeNode)
            if extreme:
                op, args = "extreme", {"model": self.extremeModelBox.currentText, "points": pts["extreme"]}
            else:
                op, args = "click", {"model": self.clickModelBox.currentText, "foreground": pts["fg"],
                                     "background": pts["bg"]}
            target = self.logic.interactiveSegmentation(volumeNode)
            worker = self.worker()

            def done(result):
                self.logic.showSegmentation(worker.read_labels(result), result["label_names"], volumeNode, target)
                self._showResult(result, target)

            self._call("Interactive segmentation", op, {**args, "volume": spec, "label": label}, onDone=done)

    def onUpload(self):
        volumeNode, segNode = self.volumeSelector.currentNode(), self.segmentationSelector.currentNode()
        dataset, split = self.datasetEdit.text.strip(), self.splitBox.currentText
        with self._reported("Upload"):
            if not dataset:
                raise ValueError("name the dataset to upload to")
            labels, names = stack_segments(self.logic.segmentArrays(segNode, volumeNode))
            spec = self._volumeSpec(volumeNode)
            args = {"volume": spec, "labels_path": self.worker().write_labels(labels), "names": names,
                    "dataset": dataset, "split": split}

            def done(r):
                self.statusLabel.text = (f"{r['status']} {dataset}/{r['case_id']} ({r['split']}, "
                                         f"{r['bytes_sent'] / 1e6:.1f} MB sent)")

            self._call("Upload", "upload", args, onDone=done, onProgress=self._showProgress)


class HPCSegLogic(ScriptedLoadableModuleLogic):
    """Slicer nodes <-> numpy, and the pip step. Nothing here talks to a server (the worker does)."""

    def ensureDependencies(self, server=False):
        """Install hpcseg (``[server]`` too for a server in Slicer's own Python) when it is first needed; True when
        usable. Slicer ≥ 5.12: ``slicer.packaging.pip_ensure``; 5.10: ``slicer.util.pip_install`` after asking.
        In testing mode nothing is installed: the test environment must have hpcseg already (say so)."""
        problem = slicerProblem() or dependencies.python_problem()
        if problem:
            raise ValueError(problem)
        source = qt.QSettings().value(SETTINGS_SOURCE, "") or ""
        reqs = dependencies.requirements(source, module_dir=_moduleDir(), server=server)
        if not dependencies.missing(reqs):
            return True
        if slicer.app.testingEnabled():
            raise ValueError(f"testing mode installs nothing: install {', '.join(reqs)} into this Slicer's Python "
                             "before running the tests (PythonSlicer -m pip install …)")
        if dependencies.install_method(slicer.app.majorVersion, slicer.app.minorVersion) == "pip_ensure":
            if not self._pipEnsure(reqs):
                return False
        else:
            if not slicer.util.confirmOkCancelDisplay(f"HPCSeg needs {', '.join(reqs)} in Slicer's Python. "
                                                      "Install it now?"):
                return False
            slicer.util.pip_install(reqs)
        ok = not dependencies.missing(reqs)
        if ok and _settingsPanel is not None:
            _settingsPanel.refresh()  # the settings page enables itself now, no restart
        return ok

    def _pipEnsure(self, reqs):
        """Slicer 5.12 and later only (``slicer.packaging`` does not exist in 5.10)."""
        from slicer import packaging  # a plain "import slicer.packaging" would rebind the name slicer

        try:
            packaging.pip_ensure(reqs, requester="HPCSeg")
        except RuntimeError:  # the user declined
            return False
        return True

    def volumeArray(self, volumeNode):
        """``(voxels (k, j, i), IJK-to-RAS 4×4, key)``; the key changes when the voxels do."""
        if volumeNode is None or volumeNode.GetImageData() is None:
            raise ValueError("select a volume")
        if volumeNode.GetParentTransformNode() is not None:
            raise ValueError(f"{volumeNode.GetName()} is under a transform: harden it first (Data module)")
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        key = f"{volumeNode.GetID()}:{volumeNode.GetImageData().GetMTime()}"
        return slicer.util.arrayFromVolume(volumeNode), slicer.util.arrayFromVTKMatrix(matrix), key

    def showSegmentation(self, labels, labelNames, volumeNode, segmentationNode=None, name=""):
        """Put each named label of a result into a segment of that name (replacing a segment of the same name)."""
        if segmentationNode is None:
            segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or "HPCSeg")
            segmentationNode.CreateDefaultDisplayNodes()
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentation = segmentationNode.GetSegmentation()
        for segName, value in sorted((labelNames or {}).items(), key=lambda kv: kv[1]):
            segmentId = segmentation.GetSegmentIdBySegmentName(segName) or segmentation.AddEmptySegment("", segName)
            binary = (labels == value).astype("uint8")
            slicer.util.updateSegmentBinaryLabelmapFromArray(binary, segmentationNode, segmentId, volumeNode)
        return segmentationNode

    def interactiveSegmentation(self, volumeNode):
        name = f"{volumeNode.GetName()} interactive"
        node = slicer.mrmlScene.GetFirstNodeByName(name)
        if node is not None and node.IsA("vtkMRMLSegmentationNode"):
            return node
        return self.showSegmentation(None, {}, volumeNode, name=name)

    def segmentArrays(self, segmentationNode, volumeNode):
        """``{segment name: binary array on the volume's grid}``."""
        if segmentationNode is None:
            raise ValueError("select the corrected segmentation")
        segmentation = segmentationNode.GetSegmentation()
        ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
        return {segmentation.GetSegment(i).GetName(): slicer.util.arrayFromSegmentBinaryLabelmap(
            segmentationNode, i, volumeNode) for i in ids}

    def pointList(self, name, colour):
        node = slicer.mrmlScene.GetFirstNodeByName(name)
        if node is None or not node.IsA("vtkMRMLMarkupsFiducialNode"):
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
            node.CreateDefaultDisplayNodes()
            node.GetDisplayNode().SetSelectedColor(*colour)
        return node

    def pointsRAS(self, node):
        out = []
        for i in range(node.GetNumberOfControlPoints()):
            if node.GetNthControlPointPositionStatus(i) == node.PositionDefined:
                pos = [0.0, 0.0, 0.0]
                node.GetNthControlPointPositionWorld(i, pos)
                out.append(pos)
        return out


def _moduleDir():
    return Path(__file__).resolve().parent


class HPCSegTest(ScriptedLoadableModuleTest):
    """Inside Slicer (ctest or Reload and Test): a phantom through the worker and the embedded ``local`` profile.

    Installs nothing (testing mode): hpcseg[server] must be preinstalled in Slicer's Python; the test says so
    in one line when it is not."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_phantom_through_the_worker()

    def test_segment_phantom_through_the_worker(self):
        problem = slicerProblem()
        if problem:
            self.skipTest(problem)
        reqs = dependencies.requirements("", module_dir=_moduleDir(), server=True)
        missing = dependencies.missing(reqs)
        self.assertEqual(missing, [], "preinstall hpcseg[server] in this Slicer's Python to run this test")
        from hpcseg.phantoms import make_phantom
        from hpcseg.worker.geometry import VolumeArray

        logic = HPCSegLogic()
        image, _, _ = make_phantom(1, shape=(48, 48, 32))
        phantom = VolumeArray.from_image(image)
        node = slicer.util.addVolumeFromArray(phantom.array, slicer.util.vtkMatrixFromArray(phantom.ijk_to_ras))
        client = WorkerClient("local")
        try:
            client.request("connect", {"timeout": 300}, timeout=600)
            array, matrix, key = logic.volumeArray(node)
            result = client.request("segment", {"volume": client.write_volume(array, matrix, key),
                                                "model": "ct-body"})
            segNode = logic.showSegmentation(client.read_labels(result), result["label_names"], node)
            segmentation = segNode.GetSegmentation()
            names = {segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())}
            self.assertEqual(names, {"body", "lungs", "bone"})
            client.request("stop")
            self.delayDisplay("HPCSeg: phantom segmented through the worker and the local server")
        finally:
            client.quit()
