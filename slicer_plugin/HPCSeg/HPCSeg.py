"""HPCSeg: segment CT and MRI in 3D Slicer with a cluster's GPUs (a thin skin over the hpcseg package).

Module, Widget, Logic and Test in the shape of Slicer's scripted-module template. The Widget only wires widgets to
calls; the Logic only moves data between Slicer nodes and plain numpy (no server calls); everything else (server
jobs, sessions, geometry, status, the dependency check) is in ``HPCSegLib``, which never imports Slicer and is
covered by pytest (``tests/slicer_plugin/``). Slicer itself cannot run in that test environment: this file is
exercised only inside Slicer (``HPCSegTest``, Developer mode → Reload and Test).
"""

from __future__ import annotations

import importlib
import time
from contextlib import contextmanager
from pathlib import Path

import ctk
import qt
import slicer
import vtk
from HPCSegLib import dependencies
from HPCSegLib.tasks import BackgroundRunner, error_text
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

SETTINGS_SOURCE = "HPCSeg/InstallSource"  # where pip gets hpcseg (Application Settings → HPCSeg)
SETTINGS_PROFILE = "HPCSeg/Profile"
COLOURS = {"ok": "#2e7d32", "busy": "#e65100", "idle": "#666666", "error": "#c62828"}
POINT_LISTS = {"fg": ("HPCSeg foreground", (0.2, 0.8, 0.2)), "bg": ("HPCSeg background", (0.9, 0.2, 0.2)),
               "extreme": ("HPCSeg extreme points", (0.2, 0.5, 1.0))}


class HPCSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "HPCSeg"
        self.parent.categories = ["Segmentation"]
        self.parent.contributors = ["hpcseg developers"]
        self.parent.helpText = """Segment the selected volume on an HPC cluster's GPU (Slurm/PBS over SSH, or a local
process), correct it interactively with foreground/background or extreme points, and upload the corrected pair to a
dataset for fine-tuning. Profiles are shared with the <code>hpcseg</code> command (Application Settings → HPCSeg)."""
        self.parent.acknowledgementText = "Built on hpcseg; interactive protocol compatible with MONAI Label."
        slicer.app.connect("startupCompleted()", _registerSettingsPanel)


def _registerSettingsPanel():
    """Add the HPCSeg page to Application Settings, as ExtensionWizard does with its SettingsPanel."""
    if slicer.app.commandOptions().noMainWindow:
        return
    from HPCSegUI.HPCSegSettingsPanel import HPCSegSettingsPanel

    slicer.app.settingsDialog().addPanel("HPCSeg", HPCSegSettingsPanel())


class HPCSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.session = None
        self.runner = BackgroundRunner()
        self.points = {}
        self._nextPoll = 0.0
        self._rerun = None  # an interactive call asked for while another ran: run it when that one ends

    # --- layout -------------------------------------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = HPCSegLogic()
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

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, lambda *a: self._bindPointLists())
        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.timer.connect("timeout()", self.onTick)
        if self._ensureDependencies():
            self._loadProfiles()
            self._bindPointLists()
        self.profileBox.connect("currentIndexChanged(int)", lambda *a: self.onProfileChanged())
        self.timer.start()
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

    def _bindPointLists(self):
        for node in self.points.values():
            self.removeObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onPointsChanged)
            self.removeObserver(node, slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent, self.onPointsChanged)
        self.points = {key: self.logic.pointList(*spec) for key, spec in POINT_LISTS.items()}
        for key, node in self.points.items():
            self.placeWidgets[key].setCurrentNode(node)
            self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onPointsChanged)
            self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent, self.onPointsChanged)

    def enter(self):
        if self.session is not None and not self.session.connected and not self.runner.busy("action"):
            self._loadProfiles()  # pick up profiles added in Application Settings

    def cleanup(self):
        self.timer.stop()
        self.removeObservers()
        if self.session is not None:
            self.runner.submit("close", self.session.close)
        self.runner.shutdown()

    # --- state --------------------------------------------------------------------------------------------------
    @contextmanager
    def _reported(self, what):
        """Errors of GUI-thread work shown as a dialog (hpcseg's sentence and hint); the widget carries on."""
        try:
            yield
        except Exception as exc:
            self._failed(what, exc)

    def _ensureDependencies(self, server=False):
        with self._reported("Installing hpcseg"):
            if self.logic.ensureDependencies(server=server):
                return True
        self.statusLabel.text = "hpcseg is not installed: press Connect to install it"
        return False

    def _loadProfiles(self):
        from HPCSegLib.profiles import profile_names

        with self._reported("Reading hpcseg's config file"):
            names, default = profile_names()
            wanted = qt.QSettings().value(SETTINGS_PROFILE, default) or default
            self.profileBox.blockSignals(True)
            self.profileBox.clear()
            self.profileBox.addItems(names)
            self.profileBox.currentIndex = names.index(wanted if wanted in names else default)
            self.profileBox.blockSignals(False)
            self.onProfileChanged()

    def onProfileChanged(self):
        from HPCSegLib.profiles import load_profile
        from HPCSegLib.session import SegmentationSession

        if self.session is not None:
            self.runner.submit("close", self.session.close)
        self.session = None
        for box in (self.modelBox, self.clickModelBox, self.extremeModelBox):
            box.clear()
        with self._reported("Reading the profile"):
            profile = load_profile(self.profileBox.currentText)
            qt.QSettings().setValue(SETTINGS_PROFILE, profile.name)
            self.session = SegmentationSession(profile, progress=lambda m: self.runner.post(self._showProgress, m))
        self._nextPoll = 0.0
        self._updateButtons()

    def _updateButtons(self):
        connected, busy = self.session is not None and self.session.connected, self.runner.busy("action")
        self.connectButton.enabled = not busy
        self.stopButton.enabled = self.session is not None
        for w in (self.segmentButton, self.uploadButton):
            w.enabled = connected and not busy

    def _showProgress(self, message):
        self.statusLabel.text = message

    def onTick(self):
        self.runner.drain()
        if self.session is not None and time.monotonic() >= self._nextPoll and not self.runner.busy("poll"):
            self._nextPoll = time.monotonic() + 60  # until the answer sets the real delay
            self.runner.submit("poll", self.session.poll, on_done=self._showStatus, on_error=self._pollFailed)

    def _showStatus(self, snapshot):
        from HPCSegLib.status import next_poll_delay

        self.statusLabel.text = snapshot.text
        self.statusLabel.setStyleSheet(f"color: {COLOURS[snapshot.severity]}")
        self._nextPoll = time.monotonic() + next_poll_delay(snapshot)
        self._updateButtons()

    def _pollFailed(self, exc):
        self.statusLabel.text = f"status unknown: {exc}"
        self._nextPoll = time.monotonic() + 10

    def _run(self, what, fn, *args, onDone=None, **kwargs):
        """Run a blocking session call on a worker; errors come back as a dialog. False if one already runs."""
        started = self.runner.submit("action", fn, *args, on_done=lambda r: self._finished(onDone, r),
                                     on_error=lambda e: self._failed(what, e), **kwargs)
        self._updateButtons()
        return started

    def _finished(self, onDone, result):
        self._updateButtons()
        if onDone is not None:
            onDone(result)
        if self._rerun is not None:
            rerun, self._rerun = self._rerun, None
            rerun()

    def _failed(self, what, exc):
        self._rerun = None
        self._updateButtons()
        message, details = error_text(exc)
        if message:  # empty for a call the user cancelled
            slicer.util.errorDisplay(f"{what} failed: {message}", detailedText=details or None)

    # --- actions ------------------------------------------------------------------------------------------------
    def onConnect(self):
        if not self._ensureDependencies():
            return
        if self.session is None or not self.session.connected:
            self._loadProfiles()  # the profile as saved now: it may have been edited in Application Settings
            if not self.points:
                self._bindPointLists()
        if self.session is None:
            return
        server = dependencies.server_extras_needed(self.session.profile.scheduler, self.session.profile.python)
        if server and not self._ensureDependencies(server=True):
            return
        self._nextPoll = 0.0
        self._run("Connecting", self.session.connect, onDone=self._showModels)

    def _showModels(self, info):
        from HPCSegLib.session import CLICK_TYPES, EXTREME_TYPES, SEGMENTATION_TYPES, models_by_type

        models = models_by_type(info)
        for box, kinds in ((self.modelBox, SEGMENTATION_TYPES), (self.clickModelBox, CLICK_TYPES),
                           (self.extremeModelBox, EXTREME_TYPES)):
            box.clear()
            box.addItems([m for kind in kinds for m in models.get(kind, [])])
        self._nextPoll = 0.0

    def onStop(self):
        if self.session is None:
            return
        self.runner.submit("stop", self.session.stop, on_done=lambda ids: self._showProgress(
            f"stopped job {' '.join(ids)}" if ids else "no server job to stop"), on_error=lambda e: self._failed(
            "Stopping the server", e))
        self._nextPoll = time.monotonic() + 2

    def onSegment(self):
        volumeNode, model = self.volumeSelector.currentNode(), self.modelBox.currentText
        with self._reported("Segmentation"):
            volume = self.logic.volumeArray(volumeNode)
            self._run("Segmentation", self.session.segment, volume, model, onDone=lambda seg: self._showResult(
                seg, self.logic.showSegmentation(seg, volumeNode, name=f"{volumeNode.GetName()} {model}")))

    def _showResult(self, seg, segmentationNode):
        self.segmentationSelector.setCurrentNode(segmentationNode)
        note = f"; warnings: {'; '.join(seg.warnings)}" if seg.warnings else ""
        self.statusLabel.text = f"{seg.model} {seg.model_version}: {', '.join(seg.label_names)}{note}"

    def onPointsChanged(self, caller, event):
        from HPCSegLib.session import EXTREME_POINTS

        volumeNode = self.volumeSelector.currentNode()
        if self.session is None or not self.session.connected or volumeNode is None:
            return
        extreme = caller is self.points["extreme"]
        pts = {k: self.logic.pointsRAS(n) for k, n in self.points.items()}
        if (extreme and len(pts["extreme"]) < EXTREME_POINTS) or (not extreme and not pts["fg"]):
            return
        label = self.labelEdit.text.strip() or "object"
        with self._reported("Interactive segmentation"):
            volume = self.logic.volumeArray(volumeNode)
            if extreme:
                call = (self.session.extreme_points, volume, self.extremeModelBox.currentText, pts["extreme"])
            else:
                call = (self.session.click, volume, self.clickModelBox.currentText, pts["fg"], pts["bg"])
            target = self.logic.interactiveSegmentation(volumeNode)

            def done(seg):
                self._showResult(seg, self.logic.showSegmentation(seg, volumeNode, target))

            if not self._run("Interactive segmentation", *call, label=label, onDone=done):
                self._rerun = lambda: self.onPointsChanged(caller, event)

    def onUpload(self):
        volumeNode, segNode = self.volumeSelector.currentNode(), self.segmentationSelector.currentNode()
        dataset, split = self.datasetEdit.text.strip(), self.splitBox.currentText
        with self._reported("Upload"):
            if not dataset:
                raise ValueError("name the dataset to upload to")
            volume, segments = self.logic.volumeArray(volumeNode), self.logic.segmentArrays(segNode, volumeNode)

            def progress(done, total):
                self.runner.post(self._showProgress, f"uploading: {100 * done // max(total, 1)} %")

            self._run("Upload", self.session.upload_pair, volume, segments, dataset=dataset, split=split,
                      progress=progress, onDone=lambda r: self._showProgress(
                          f"{r.status} {dataset}/{r.case_id} ({r.split}, {r.bytes_sent / 1e6:.1f} MB sent)"))


class HPCSegLogic(ScriptedLoadableModuleLogic):
    """Slicer nodes <-> HPCSegLib's plain data, and the pip step. Nothing here talks to a server."""

    def ensureDependencies(self, server=False):
        """Install hpcseg (``[server]`` too for a server in this Python) if missing; True when usable."""
        problem = dependencies.python_problem()
        if problem:
            raise ValueError(problem)
        source = qt.QSettings().value(SETTINGS_SOURCE, "") or ""
        reqs = dependencies.requirements(source, module_dir=Path(__file__).parent, server=server)
        if not dependencies.unmet(reqs):
            return True
        try:
            from slicer import packaging  # newer Slicer (a plain "import slicer.packaging" would shadow slicer)
        except ImportError:
            if not slicer.util.confirmOkCancelDisplay(f"HPCSeg needs {', '.join(reqs)}. Install it now?"):
                return False
            slicer.util.pip_install(reqs)
        else:
            try:
                packaging.pip_ensure(reqs, requester="HPCSeg")
            except RuntimeError:  # the user declined
                return False
        importlib.invalidate_caches()
        return not dependencies.unmet(reqs)

    def volumeArray(self, volumeNode):
        from HPCSegLib.geometry import VolumeArray

        if volumeNode is None or volumeNode.GetImageData() is None:
            raise ValueError("select a volume")
        if volumeNode.GetParentTransformNode() is not None:
            raise ValueError(f"{volumeNode.GetName()} is under a transform: harden it first (Data module)")
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        key = f"{volumeNode.GetID()}:{volumeNode.GetImageData().GetMTime()}"
        return VolumeArray(slicer.util.arrayFromVolume(volumeNode).copy(), slicer.util.arrayFromVTKMatrix(matrix), key)

    def showSegmentation(self, seg, volumeNode, segmentationNode=None, name=""):
        """Put each named label of a result into a segment of that name (replacing a segment of the same name)."""
        if segmentationNode is None:
            segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or "HPCSeg")
            segmentationNode.CreateDefaultDisplayNodes()
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentation = segmentationNode.GetSegmentation()
        for segName, _value, binary in seg.segments() if seg is not None else ():
            segmentId = segmentation.GetSegmentIdBySegmentName(segName) or segmentation.AddEmptySegment("", segName)
            slicer.util.updateSegmentBinaryLabelmapFromArray(binary, segmentationNode, segmentId, volumeNode)
        return segmentationNode

    def interactiveSegmentation(self, volumeNode):
        name = f"{volumeNode.GetName()} interactive"
        node = slicer.mrmlScene.GetFirstNodeByName(name)
        if node is not None and node.IsA("vtkMRMLSegmentationNode"):
            return node
        return self.showSegmentation(None, volumeNode, name=name)

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


class HPCSegTest(ScriptedLoadableModuleTest):
    """Inside Slicer: a phantom through the embedded ``local`` profile, end to end (needs hpcseg[server])."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_phantom()

    def test_segment_phantom(self):
        from HPCSegLib.geometry import VolumeArray
        from HPCSegLib.session import SegmentationSession

        from hpcseg.config import local_profile
        from hpcseg.phantoms import make_phantom

        logic = HPCSegLogic()
        self.assertTrue(logic.ensureDependencies(server=True))
        image, _, _ = make_phantom(1, shape=(48, 48, 32))
        phantom = VolumeArray.from_image(image)
        node = slicer.util.addVolumeFromArray(phantom.array, slicer.util.vtkMatrixFromArray(phantom.ijk_to_ras))
        session = SegmentationSession(local_profile())
        try:
            session.connect()
            segNode = logic.showSegmentation(session.segment(logic.volumeArray(node), "ct-body"), node)
            segmentation = segNode.GetSegmentation()
            names = {segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())}
            self.assertEqual(names, {"body", "lungs", "bone"})
            self.delayDisplay("HPCSeg: phantom segmented through the local server")
        finally:
            session.stop()
