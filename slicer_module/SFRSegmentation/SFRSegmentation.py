"""SFRSegmentation: train a 3D segmenter from a few segmented cases plus unsegmented volumes
(SAM stitching, fine-tuning, V-Net re-training), then segment volumes of the scene with it.

The work is done by libsfr through SFRSegmentationLib (plain Python + numpy + ctypes, tested
without Slicer); this file only moves data between the scene and that library and keeps the
GUI responsive: every long job is polled from a QTimer, never waited on.

PyTorch: libsfr carries its own libtorch (found through the path recorded when it was built).
If another extension has already imported PyTorch into Slicer's Python, two libtorch builds
would share the process, so in "Automatic" mode the jobs then run in a separate worker process
(the ``sfr`` command-line tool), with the same progress and cancellation.
"""
import datetime
import logging
import os
import shutil
import time

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

import SFRSegmentationLib as sfrlib

SETTINGS = "SFRSegmentation/"
MODE_LABELS = [("auto", "Automatic"), ("in-process", "In Slicer's process"), ("worker", "Separate worker process")]
METHOD_LABELS = [
    ("mean-teacher", "Mean teacher (default)"),
    ("supervised", "Supervised (labelled cases only)"),
    ("self-training", "Self-training"),
    ("acmt", "ACMT (ambiguity-selective mean teacher)"),
]
PRESET_LABELS = [
    ("cpu-small", "CPU, small (minutes)"),
    ("paper-la", "Paper settings (GPU, hours)"),
    ("test-tiny", "Smoke test (seconds, not accurate)"),
]
POLL_MS = 250


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


class SFRSegmentation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SFR Segmentation"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["SFR authors"]
        self.parent.helpText = (
            "Train a segmentation model from a few segmented cases and many unsegmented volumes "
            "(SAM stitching, fine-tuning and V-Net re-training), then segment volumes with it. "
            "See slicer_module/README.md for installation and a walkthrough."
        )
        self.parent.acknowledgementText = "Method: Stitching, Fine-tuning, Re-training (SFR)."


# ---------------------------------------------------------------------------------------------
# Logic: scene <-> arrays, and results into segmentation nodes


class SFRSegmentationLogic(ScriptedLoadableModuleLogic):
    """Slicer-side glue. Library work goes through ``self.sfr`` (an SFRSegmentationLib.SFRLogic)."""

    def __init__(self, library_path=None, mode="auto"):
        ScriptedLoadableModuleLogic.__init__(self)
        self.sfr = sfrlib.SFRLogic(library_path=library_path or None, mode=mode)
        self._models = {}

    # -- volumes ---------------------------------------------------------------------------
    @staticmethod
    def volumeArrayAndMatrix(volumeNode):
        """A volume's voxels ``[k, j, i]`` and its IJK-to-RAS matrix (oblique included)."""
        if volumeNode.GetParentTransformNode() is not None:
            raise ValueError(
                f"'{volumeNode.GetName()}' is under a transform: harden the transform first "
                "(Data module, right-click > Harden transform), so that voxels and geometry agree"
            )
        if volumeNode.GetImageData() is None:
            raise ValueError(f"'{volumeNode.GetName()}' has no voxels")
        array = slicer.util.arrayFromVolume(volumeNode)
        m = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(m)
        return array, slicer.util.arrayFromVTKMatrix(m)

    @staticmethod
    def classNamesOf(pairs):
        """Class names from the segments of the labelled cases (by name, first appearance)."""
        names = []
        for _volumeNode, segmentationNode in pairs:
            segmentation = segmentationNode.GetSegmentation()
            for segmentId in segmentation.GetSegmentIDs():
                name = segmentation.GetSegment(segmentId).GetName()
                if name not in names:
                    names.append(name)
        return names

    def trainingDataFromScene(self, pairs, unlabeledNodes=(), unlabeledFolder=None, log=print):
        """TrainingData from (volume, segmentation) pairs, unlabelled volumes of the scene and
        the volume files of a folder. Segment masks are exported on each volume's own grid."""
        if not pairs:
            raise ValueError("add at least one labelled case (a volume with its segmentation)")
        names = self.classNamesOf(pairs)
        if not names:
            raise ValueError("the segmentations of the labelled cases have no segments")
        if len(names) > 255:
            raise ValueError(f"{len(names)} segment names: at most 255 classes are supported")
        data = sfrlib.TrainingData(["background"] + names)
        for volumeNode, segmentationNode in pairs:
            if segmentationNode.GetParentTransformNode() is not None:
                raise ValueError(f"'{segmentationNode.GetName()}' is under a transform: harden it first")
            array, m = self.volumeArrayAndMatrix(volumeNode)
            label = np.zeros(array.shape, dtype=np.uint8)
            segmentation = segmentationNode.GetSegmentation()
            present = []
            for segmentId in segmentation.GetSegmentIDs():
                name = segmentation.GetSegment(segmentId).GetName()
                mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
                label[mask > 0] = names.index(name) + 1
                present.append(name)
            missing = [n for n in names if n not in present]
            if missing:
                log(f"warning: '{segmentationNode.GetName()}' has no segment {', '.join(missing)}: "
                    "those structures count as absent (background) in this case")
            data.add_labeled(array, label, m, case_id=self._caseId(volumeNode))
        for volumeNode in unlabeledNodes:
            if any(volumeNode is v for v, _ in pairs):
                continue
            array, m = self.volumeArrayAndMatrix(volumeNode)
            data.add_unlabeled(array, m, case_id=self._caseId(volumeNode))
        if unlabeledFolder:
            self._addFolder(data, unlabeledFolder, log)
        return data

    @staticmethod
    def _caseId(volumeNode):
        # Names repeat in a scene ("1: Unnamed Series"); node IDs do not.
        return f"{volumeNode.GetName()} [{volumeNode.GetID()}]"

    def _addFolder(self, data, folder, log):
        suffixes = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(suffixes))
        if not files:
            raise ValueError(f"no volume file (NIfTI, NRRD, MHA) in {folder}")
        for n, name in enumerate(files):
            path = os.path.join(folder, name)
            log(f"reading unlabelled volume {n + 1}/{len(files)}: {name}")
            slicer.app.processEvents()
            node = slicer.util.loadVolume(path, properties={"show": False, "singleFile": True})
            try:
                array, m = self.volumeArrayAndMatrix(node)
                data.add_unlabeled(array.copy(), m, case_id=f"{n:04d}_{name}")
            finally:
                slicer.mrmlScene.RemoveNode(node)

    # -- models ----------------------------------------------------------------------------
    def model(self, path):
        """A loaded model, cached by path (loading costs a second or two)."""
        path = str(path)
        if path not in self._models:
            self._models[path] = self.sfr.load_model(path)
        return self._models[path]

    def forgetModel(self, path):
        model = self._models.pop(str(path), None)
        if model is not None:
            model.close()

    # -- results ---------------------------------------------------------------------------
    @staticmethod
    def _uniqueSegmentName(segmentation, name):
        existing = {segmentation.GetSegment(s).GetName() for s in segmentation.GetSegmentIDs()}
        if name not in existing:
            return name
        candidate, n = f"{name} (SFR)", 2
        while candidate in existing:
            candidate, n = f"{name} (SFR {n})", n + 1
        return candidate

    def applySegmentation(self, labels, volumeNode, classNames, segmentationNode=None):
        """Adds one new segment per class found in ``labels`` (an array on ``volumeNode``'s
        grid) to ``segmentationNode`` (a new node when None). Existing segments are never
        modified: the labels are imported as new segments with names made unique. Returns an
        undo record for ``undoSegmentation``."""
        if segmentationNode is not None and segmentationNode.GetParentTransformNode() is not None:
            raise ValueError(f"'{segmentationNode.GetName()}' is under a transform: harden it first or create a new segmentation")
        if hasattr(slicer.mrmlScene, "SaveStateForUndo"):
            slicer.mrmlScene.SaveStateForUndo()
        created = segmentationNode is None
        if created:
            segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volumeNode.GetName()} SFR")
        if segmentationNode.GetDisplayNode() is None:
            segmentationNode.CreateDefaultDisplayNodes()
        segmentation = segmentationNode.GetSegmentation()
        if segmentation.GetNumberOfSegments() == 0:
            # An empty node takes the volume's grid; a node with segments keeps its own.
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        before = set(segmentation.GetSegmentIDs())
        # The labelmap takes the volume's full IJK-to-RAS (CopyOrientation: origin, spacing and
        # axis directions), so oblique volumes land exactly where the voxels were.
        labelmapNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "SFR labels (temporary)")
        try:
            labelmapNode.CopyOrientation(volumeNode)
            slicer.util.updateVolumeFromArray(labelmapNode, np.ascontiguousarray(labels))
            ok = slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmapNode, segmentationNode)
            if not ok:
                raise RuntimeError("Slicer could not import the label map into the segmentation")
        finally:
            slicer.mrmlScene.RemoveNode(labelmapNode)
        added = [s for s in segmentation.GetSegmentIDs() if s not in before]
        values = sorted(int(v) for v in np.unique(labels) if v != 0)
        for n, segmentId in enumerate(added):
            segment = segmentation.GetSegment(segmentId)
            value = segment.GetLabelValue() if hasattr(segment, "GetLabelValue") else values[n]
            name = classNames.get(int(value), f"class {value}")
            segment.SetName(self._uniqueSegmentName(segmentation, name))
        return {"segmentationNode": segmentationNode, "segmentIds": added, "created": created}

    @staticmethod
    def undoSegmentation(record):
        """Removes exactly what ``applySegmentation`` added."""
        node = record["segmentationNode"]
        if node is None or node.GetScene() is None:
            return
        if record["created"]:
            slicer.mrmlScene.RemoveNode(node)
            return
        segmentation = node.GetSegmentation()
        for segmentId in record["segmentIds"]:
            if segmentation.GetSegment(segmentId) is not None:
                segmentation.RemoveSegment(segmentId)


# ---------------------------------------------------------------------------------------------
# Widget


class SFRSegmentationWidget(ScriptedLoadableModuleWidget):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.logic = None
        self.job = None
        self.jobKind = None
        self.jobDone = None
        self.lastProgress = None
        self.pairs = []  # [(volume node ID, segmentation node ID)]
        self.undoStack = []
        self.download = None

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
        self.ui.libraryPathLineEdit.filters = ctk.ctkPathLineEdit.Files
        self.ui.modelsFolderLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.unlabeledFolderLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.samCheckpointLineEdit.filters = ctk.ctkPathLineEdit.Files
        self.ui.samCheckpointLineEdit.nameFilters = ["PyTorch checkpoint (*.pth *.pt *.safetensors)"]
        self.ui.labeledTable.horizontalHeader().setStretchLastSection(True)
        self.ui.modelsTable.horizontalHeader().setStretchLastSection(True)

        # Settings survive restarts.
        self.ui.libraryPathLineEdit.currentPath = _setting("libraryPath")
        self.ui.modeComboBox.setCurrentIndex(max(0, self.ui.modeComboBox.findData(_setting("mode", "auto"))))
        self.ui.modelsFolderLineEdit.currentPath = _setting("modelsFolder", os.path.join(slicer.app.defaultScenePath, "SFRModels"))
        self.ui.samCheckpointLineEdit.currentPath = _setting("samCheckpoint")
        self.ui.methodComboBox.setCurrentIndex(max(0, self.ui.methodComboBox.findData(_setting("method", "mean-teacher"))))
        self.ui.presetComboBox.setCurrentIndex(max(0, self.ui.presetComboBox.findData(_setting("preset", "cpu-small"))))

        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.connect("timeout()", self.onTimer)
        self.downloadTimer = qt.QTimer()
        self.downloadTimer.setInterval(POLL_MS)
        self.downloadTimer.connect("timeout()", self.onDownloadTimer)

        self.ui.libraryPathLineEdit.connect("currentPathChanged(QString)", self.onLibrarySettingsChanged)
        self.ui.modeComboBox.connect("currentIndexChanged(int)", self.onLibrarySettingsChanged)
        self.ui.modelsFolderLineEdit.connect("currentPathChanged(QString)", self.onModelsFolderChanged)
        self.ui.samCheckpointLineEdit.connect("currentPathChanged(QString)", lambda p: _set_setting("samCheckpoint", p))
        self.ui.methodComboBox.connect("currentIndexChanged(int)", lambda i: _set_setting("method", _comboData(self.ui.methodComboBox)))
        self.ui.presetComboBox.connect("currentIndexChanged(int)", lambda i: _set_setting("preset", _comboData(self.ui.presetComboBox)))
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
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", lambda n: self.updateButtons())
        self.ui.modelsTable.connect("itemSelectionChanged()", self.updateButtons)

        self.onLibrarySettingsChanged()
        self.refreshModels()
        self.updateButtons()

    def cleanup(self):
        self.timer.stop()
        self.downloadTimer.stop()
        if self.job is not None:
            self.job.cancel()
            self.job.close()
            self.job = None
        if self.download is not None:
            self.download.cancel()

    # -- library ---------------------------------------------------------------------------
    def onLibrarySettingsChanged(self, *_):
        path = self.ui.libraryPathLineEdit.currentPath
        mode = _comboData(self.ui.modeComboBox) or "auto"
        _set_setting("libraryPath", path)
        _set_setting("mode", mode)
        if self.job is not None:
            return  # the running job keeps its library; the new setting applies to the next one
        self.logic = SFRSegmentationLogic(path, mode)
        try:
            info = self.logic.sfr.describe()
            where = "in Slicer's process" if info["mode"] == "in-process" else "in a separate worker process"
            why = " (PyTorch is already loaded in Slicer's Python)" if mode == "auto" and info["mode"] == "worker" else ""
            self.ui.libraryStatusLabel.text = f"SFR {info['version']} from {info['path']}, jobs run {where}{why}."
            self.ui.libraryStatusLabel.styleSheet = ""
        except Exception as e:
            self.ui.libraryStatusLabel.text = str(e)
            self.ui.libraryStatusLabel.styleSheet = "color: #b00000"
            self.ui.setupCollapsibleButton.collapsed = False

    # -- labelled cases --------------------------------------------------------------------
    def onAddPair(self):
        volumeNode = self.ui.labeledVolumeSelector.currentNode()
        segmentationNode = self.ui.labeledSegmentationSelector.currentNode()
        if volumeNode is None or segmentationNode is None:
            slicer.util.warningDisplay("Choose a volume and its segmentation first.")
            return
        pair = (volumeNode.GetID(), segmentationNode.GetID())
        if pair in self.pairs:
            return
        self.pairs.append(pair)
        self.refreshPairs()

    def onRemovePair(self):
        rows = sorted(_selectedRows(self.ui.labeledTable), reverse=True)
        for row in rows:
            if 0 <= row < len(self.pairs):
                del self.pairs[row]
        self.refreshPairs()

    def pairNodes(self):
        nodes = []
        for volumeId, segmentationId in self.pairs:
            v, s = slicer.mrmlScene.GetNodeByID(volumeId), slicer.mrmlScene.GetNodeByID(segmentationId)
            if v is not None and s is not None:
                nodes.append((v, s))
        return nodes

    def refreshPairs(self):
        self.pairs = [(v.GetID(), s.GetID()) for v, s in self.pairNodes()]  # drop deleted nodes
        table = self.ui.labeledTable
        table.setRowCount(len(self.pairs))
        for row, (v, s) in enumerate(self.pairNodes()):
            table.setItem(row, 0, qt.QTableWidgetItem(v.GetName()))
            table.setItem(row, 1, qt.QTableWidgetItem(s.GetName()))
        self.updateButtons()

    # -- jobs ------------------------------------------------------------------------------
    def log(self, text):
        stamp = datetime.datetime.now().strftime("%H:%M:%S")
        self.ui.logTextEdit.appendPlainText(f"{stamp}  {text}")
        logging.info(f"SFRSegmentation: {text}")

    def updateButtons(self):
        idle = self.job is None
        self.ui.trainButton.enabled = idle and bool(self.pairs)
        self.ui.segmentButton.enabled = idle and self.ui.inputVolumeSelector.currentNode() is not None and self.selectedModelEntry() is not None
        self.ui.cancelButton.enabled = not idle
        self.ui.undoSegmentButton.enabled = idle and bool(self.undoStack)
        self.ui.removeModelButton.enabled = idle and self.selectedModelEntry() is not None
        self.ui.removePairButton.enabled = idle and bool(self.pairs)

    def startJob(self, kind, job, onDone):
        self.job, self.jobKind, self.jobDone, self.lastProgress = job, kind, onDone, None
        self.ui.progressBar.setValue(0)
        self.ui.progressCollapsibleButton.collapsed = False
        self.timer.start()
        self.updateButtons()

    def onTimer(self):
        job = self.job
        if job is None:
            self.timer.stop()
            return
        try:
            p = job.poll()
        except Exception as e:
            p = {"finished": True, "stage": "error", "step": 0, "total": 0, "loss": None, "eta_seconds": None, "message": str(e)}
        self.showProgress(p)
        if not p["finished"]:
            return
        self.timer.stop()
        self.job = None
        try:
            result = job.wait()
        except sfrlib.Cancelled:
            self.log(f"{self.jobKind} cancelled")
            self.ui.statusLabel.text = f"{self.jobKind.capitalize()} cancelled."
        except Exception as e:
            self.log(f"{self.jobKind} failed: {e}")
            self.ui.statusLabel.text = f"{self.jobKind.capitalize()} failed."
            slicer.util.errorDisplay(f"{self.jobKind.capitalize()} failed:\n\n{e}")
        else:
            try:
                self.jobDone(result)
            except Exception as e:
                logging.exception("SFRSegmentation")
                slicer.util.errorDisplay(f"{self.jobKind.capitalize()} finished, but its result could not be used:\n\n{e}")
        finally:
            job.close()
            self.updateButtons()

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
        if self.job is not None:
            self.job.cancel()
            self.log(f"cancelling {self.jobKind}...")
            self.ui.cancelButton.enabled = False

    # -- training --------------------------------------------------------------------------
    def onTrain(self):
        if self.logic is None or self.job is not None:
            return
        try:
            data = self.logic.trainingDataFromScene(
                self.pairNodes(),
                self.ui.unlabeledVolumesSelector.checkedNodes(),
                self.ui.unlabeledFolderLineEdit.currentPath or None,
                log=self.log,
            )
            labeled, unlabeled = data.counts()
            samCheckpoint = self.ui.samCheckpointLineEdit.currentPath or None
            job = self.logic.sfr.start_training(
                data,
                preset=_comboData(self.ui.presetComboBox),
                method=_comboData(self.ui.methodComboBox),
                use_sam=self.ui.useSamCheckBox.checked,
                sam_checkpoint=samCheckpoint,
            )
        except Exception as e:
            logging.exception("SFRSegmentation")
            slicer.util.errorDisplay(f"Training could not start:\n\n{e}")
            return
        names = ", ".join(n for c, n in data.classes.items() if c)
        self.log(f"training on {labeled} labelled and {unlabeled} unlabelled volumes; classes: {names}")
        self.startJob("training", job, self.onTrainingDone)

    def onTrainingDone(self, model):
        registry = self.registry()
        try:
            entry = registry.add(model)
        except Exception as e:
            # Never lose a finished training to an unwritable folder.
            fallback = os.path.join(slicer.app.temporaryPath, f"sfr-model-{datetime.datetime.now():%Y%m%d-%H%M%S}.sfrmodel")
            model.save(fallback)
            raise RuntimeError(
                f"the model could not be saved in {registry.folder} ({e}). It was saved as {fallback}: "
                "choose a writable models folder, then add it with 'Load model file...'"
            )
        finally:
            model.close()
        dice = entry.validation_dice
        self.log(f"model saved as '{entry.name}' in {registry.folder}" + (f"; validation Dice {dice:.3f}" if dice is not None else ""))
        self.ui.statusLabel.text = f"Training finished: model '{entry.name}'."
        self.refreshModels(select=entry.name)

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
            for col, text in enumerate([e.name, f"{dice:.3f}" if dice is not None else "-", created, classes, method]):
                item = qt.QTableWidgetItem(text)
                item.setToolTip(e.summary)
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
        try:
            sfrlib.read_metadata(path)  # refuse anything that is not a model before copying it
            registry = self.registry()
            registry.folder.mkdir(parents=True, exist_ok=True)
            name = registry.unique_name(os.path.basename(path)[: -len(".sfrmodel")])
            shutil.copyfile(path, registry.path_for(name))
        except Exception as e:
            slicer.util.errorDisplay(f"Could not load {path}:\n\n{e}")
            return
        self.log(f"model '{name}' added to {registry.folder}")
        self.refreshModels(select=name)

    def onRemoveModel(self):
        entry = self.selectedModelEntry()
        if entry is None or not slicer.util.confirmYesNoDisplay(f"Delete the model '{entry.name}' ({entry.path})?"):
            return
        self.logic.forgetModel(entry.path)
        self.registry().remove(entry.name)
        self.log(f"model '{entry.name}' removed")
        self.refreshModels()

    # -- segmentation ----------------------------------------------------------------------
    def onSegment(self):
        entry = self.selectedModelEntry()
        volumeNode = self.ui.inputVolumeSelector.currentNode()
        if entry is None or volumeNode is None or self.job is not None:
            return
        try:
            model = self.logic.model(entry.path)
            array, m = self.logic.volumeArrayAndMatrix(volumeNode)
            job = model.start_segmentation(array, m)
        except Exception as e:
            logging.exception("SFRSegmentation")
            slicer.util.errorDisplay(f"Segmentation could not start:\n\n{e}")
            return
        volumeId = volumeNode.GetID()
        outputNode = self.ui.outputSegmentationSelector.currentNode()
        outputId = outputNode.GetID() if outputNode is not None else None
        classNames = model.class_names()
        self.log(f"segmenting '{volumeNode.GetName()}' with '{entry.name}'")

        def done(labels):
            volume = slicer.mrmlScene.GetNodeByID(volumeId)
            if volume is None:
                raise RuntimeError("the volume was removed from the scene during segmentation")
            output = slicer.mrmlScene.GetNodeByID(outputId) if outputId else None
            record = self.logic.applySegmentation(labels, volume, classNames, output)
            self.undoStack.append(record)
            counts = {classNames.get(c, str(c)): int((labels == c).sum()) for c in classNames if c}
            self.log("segmentation added: " + ", ".join(f"{n} {v} voxels" for n, v in counts.items()))
            self.ui.statusLabel.text = f"Segmented '{volume.GetName()}' into '{record['segmentationNode'].GetName()}'."
            self.ui.outputSegmentationSelector.setCurrentNode(record["segmentationNode"])

        self.startJob("segmentation", job, done)

    def onUndoSegment(self):
        if self.undoStack:
            record = self.undoStack.pop()
            self.logic.undoSegmentation(record)
            self.log("last segmentation removed")
        self.updateButtons()


# ---------------------------------------------------------------------------------------------
# Test (runs inside Slicer: Developer mode > Reload and Test, or
# Slicer --python-code "slicer.util.selectModule('SFRSegmentation'); slicer.modules.SFRSegmentationWidget.onReloadAndTest()")


class SFRSegmentationTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_geometry_conversion()
        self.setUp()
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

    def test_geometry_conversion(self):
        """Slicer's own IJK-to-RAS of a volume converts to LPS and back exactly."""
        m = self.obliqueMatrix()
        volume = slicer.util.addVolumeFromArray(np.zeros((4, 5, 6), dtype=np.int16), ijkToRAS=m, name="g")
        _, back = SFRSegmentationLogic.volumeArrayAndMatrix(volume)
        self.assertTrue(np.allclose(back, m, atol=1e-9))
        g = sfrlib.ijk_to_ras_to_lps_geometry(back)
        self.assertTrue(np.allclose(sfrlib.lps_geometry_to_ijk_to_ras(g), m, atol=1e-9))
        self.delayDisplay("geometry conversion OK")

    def test_train_and_segment_oblique_phantom(self):
        logic = SFRSegmentationLogic()
        m = self.obliqueMatrix()
        pairs = []
        for seed in range(2):
            image, label = self.phantom(seed)
            volume = slicer.util.addVolumeFromArray(image, ijkToRAS=m, name=f"labelled{seed}")
            segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"labels{seed}")
            record = logic.applySegmentation(label, volume, {1: "blob"}, segmentationNode)
            self.assertEqual(len(record["segmentIds"]), 1)
            pairs.append((volume, segmentationNode))
        unlabeled = [slicer.util.addVolumeFromArray(self.phantom(s)[0], ijkToRAS=m, name=f"unlabelled{s}") for s in (2, 3)]
        data = logic.trainingDataFromScene(pairs, unlabeled)
        self.assertEqual(data.counts(), (2, 2))
        self.assertEqual(data.classes, {0: "background", 1: "blob"})
        # The label exported from the segmentation is the phantom's label: geometry round trip.
        self.assertTrue(np.array_equal(data.labeled[0].label, self.phantom(0)[1]))

        self.delayDisplay("training (test-tiny preset)")
        job = logic.sfr.start_training(data, preset="test-tiny")
        start = time.time()
        while not job.poll()["finished"]:
            slicer.app.processEvents()
            time.sleep(0.1)
            self.assertLess(time.time() - start, 600)
        model = job.wait()
        self.assertEqual(model.class_names(), {0: "background", 1: "blob"})

        image, truth = self.phantom(11)
        target = slicer.util.addVolumeFromArray(image, ijkToRAS=m, name="target")
        # A manual segment that overlaps the blob must survive untouched.
        output = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "manual")
        manual = np.zeros_like(truth)
        manual[5:12, 5:15, 10:20] = 1
        logic.applySegmentation(manual, target, {1: "blob"}, output)
        manualId = output.GetSegmentation().GetSegmentIDs()[0]
        before = slicer.util.arrayFromSegmentBinaryLabelmap(output, manualId, target).copy()

        labels = model.segment(*SFRSegmentationLogic.volumeArrayAndMatrix(target))
        self.assertEqual(labels.shape, image.shape)
        record = logic.applySegmentation(labels, target, model.class_names(), output)
        segmentation = output.GetSegmentation()
        self.assertEqual(len(segmentation.GetSegmentIDs()), 2)
        newId = record["segmentIds"][0]
        self.assertEqual(segmentation.GetSegment(newId).GetName(), "blob (SFR)")  # unique name
        after = slicer.util.arrayFromSegmentBinaryLabelmap(output, manualId, target)
        self.assertTrue(np.array_equal(before, after), "the manual segment was modified")
        # The new segment, read back on the volume's grid, is the label array: no flip, no shift.
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(output, newId, target)
        self.assertTrue(np.array_equal(mask > 0, labels == 1))

        SFRSegmentationLogic.undoSegmentation(record)
        self.assertEqual(list(segmentation.GetSegmentIDs()), [manualId])
        model.close()
        self.delayDisplay("SFRSegmentation test passed")
