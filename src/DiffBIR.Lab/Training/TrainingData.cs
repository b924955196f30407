using System.Collections.Concurrent;
using DiffBIR.Lab.Degradation;
using DiffBIR.Lab.IO;
using DiffBIR.Lab.Metrics;
using TorchSharp;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace DiffBIR.Lab.Training;

/// <summary>One training image and its caption (official file lists: <c>image_path</c>, <c>prompt</c>).</summary>
public sealed record TrainingItem(string Path, string Prompt);

/// <summary>Which degradation turns a high-quality crop into its low-quality partner.</summary>
public enum TrainingDegradation
{
    /// <summary>Eq. 2 of the paper, per image (official CodeformerDataset: stage 1 and stage 2 v2).</summary>
    FirstOrder,
    /// <summary>Real-ESRGAN kernels per image (RealESRGANDataset) and the second-order batch transform (stage 2 v2.1).</summary>
    SecondOrder,
}

/// <summary>
/// The per-image kernels of the official <c>RealESRGANDataset</c> (configs/train/train_stage2_v2.1.yaml, dataset
/// params): kernel1 and kernel2 (a sinc with probability sinc_prob, else a random_mixed_kernels draw), both zero-padded
/// to 21×21, and the final sinc (probability final_sinc_prob, else a 21×21 pulse).
/// </summary>
public sealed record RealEsrganKernelConfig
{
    public IReadOnlyList<int> KernelRange { get; init; } = new[] { 7, 9, 11, 13, 15, 17, 19, 21 };
    public IReadOnlyList<BlurKernelType> KernelList { get; init; } = new[]
    {
        BlurKernelType.Iso, BlurKernelType.Aniso, BlurKernelType.GeneralizedIso, BlurKernelType.GeneralizedAniso,
        BlurKernelType.PlateauIso, BlurKernelType.PlateauAniso,
    };
    public IReadOnlyList<double> KernelProb { get; init; } = new[] { 0.45, 0.25, 0.12, 0.03, 0.12, 0.03 };
    public double SincProb { get; init; } = 0.1;
    public ValueRange BlurSigma { get; init; } = new(0.2, 3);
    public ValueRange BetaG { get; init; } = new(0.5, 4);
    public ValueRange BetaP { get; init; } = new(1, 2);
    public double SincProb2 { get; init; } = 0.1;
    public ValueRange BlurSigma2 { get; init; } = new(0.2, 1.5);
    public ValueRange BetaG2 { get; init; } = new(0.5, 4);
    public ValueRange BetaP2 { get; init; } = new(1, 2);
    public double FinalSincProb { get; init; } = 0.8;

    public static RealEsrganKernelConfig V2_1 { get; } = new();

    /// <summary>kernel1, kernel2, sinc_kernel (float32 [21,21] each), drawn in the dataset's order.</summary>
    public (Tensor Kernel1, Tensor Kernel2, Tensor Sinc) Draw(IDegradationRandom rng)
    {
        Tensor One(double sincProb, ValueRange sigma, ValueRange betaG, ValueRange betaP)
        {
            int size = KernelRange[rng.Choose(KernelRange.Select(_ => 1.0).ToArray())];
            Tensor k;
            if (rng.Uniform(0, 1) < sincProb)
            {
                double omega = size < 13 ? rng.Uniform(Math.PI / 3, Math.PI) : rng.Uniform(Math.PI / 5, Math.PI);
                k = BlurKernels.CircularLowpass(omega, size);
            }
            else k = BlurKernels.RandomMixed(KernelList, KernelProb, rng, size, sigma, sigma, new(-Math.PI, Math.PI), betaG, betaP).Kernel;
            int pad = (21 - size) / 2;
            using (k) return F.pad(k.unsqueeze(0), new long[] { pad, pad, pad, pad }).squeeze(0).to(ScalarType.Float32);
        }
        var k1 = One(SincProb, BlurSigma, BetaG, BetaP);
        var k2 = One(SincProb2, BlurSigma2, BetaG2, BetaP2);
        Tensor sinc;
        if (rng.Uniform(0, 1) < FinalSincProb)
        {
            int size = KernelRange[rng.Choose(KernelRange.Select(_ => 1.0).ToArray())];
            using var s = BlurKernels.CircularLowpass(rng.Uniform(Math.PI / 3, Math.PI), size, padTo: 21);
            sinc = s.to(ScalarType.Float32);
        }
        else
        {
            sinc = zeros(21, 21, ScalarType.Float32);
            sinc[10, 10] = tensor(1f);
        }
        return (k1, k2, sinc);
    }
}

/// <summary>Options of <see cref="TrainingLoader"/>; defaults are the official stage-1 dataset's.</summary>
public sealed record TrainingDataOptions
{
    /// <summary>Crop size (official out_size).</summary>
    public int OutSize { get; init; } = 512;
    public int BatchSize { get; init; } = 1;
    /// <summary>Everything random (order, crops, flips, degradations, prompt dropout) derives from this seed.</summary>
    public long Seed { get; init; } = 231;
    public bool HorizontalFlip { get; init; } = true;
    public TrainingDegradation Degradation { get; init; } = TrainingDegradation.FirstOrder;
    public FirstOrderDegradation FirstOrder { get; init; } = FirstOrderDegradation.TrainStage1;
    public RealEsrganKernelConfig Kernels { get; init; } = RealEsrganKernelConfig.V2_1;
    public RealEsrganBatchTransformConfig SecondOrder { get; init; } = RealEsrganBatchTransformConfig.V2_1;
    /// <summary>Probability that a sample's prompt is replaced by "" (official p_empty_prompt; v2: 0.5 in CodeformerDataset).</summary>
    public double EmptyPromptProbability { get; init; }
    /// <summary>How many decoded (or decoding) samples may wait ahead of the training loop (bounded queue).</summary>
    public int QueueCapacity { get; init; } = 16;
}

/// <summary>A batch as the official loaders yield it: gt [B,H,W,3] in [−1, 1], lq [B,H,W,3] in [0, 1] (float32, CPU).</summary>
public sealed class TrainingBatch : IDisposable
{
    public Tensor Gt { get; }
    public Tensor Lq { get; }
    public IReadOnlyList<string> Prompts { get; }
    public IReadOnlyList<string> Files { get; }
    /// <summary>Stream position of the first sample, and the position after the last one consumed.</summary>
    public long Start { get; }
    public long End { get; }

    public TrainingBatch(Tensor gt, Tensor lq, IReadOnlyList<string> prompts, IReadOnlyList<string> files, long start, long end)
    {
        Gt = gt; Lq = lq; Prompts = prompts; Files = files; Start = start; End = end;
    }

    public void Dispose() { Gt.Dispose(); Lq.Dispose(); }
}

/// <summary>
/// Streams training batches from a list of high-quality images. The images form an endless stream of positions
/// p = epoch · N + i, where epoch e visits the images in a seeded permutation; position p is decoded, cropped
/// (out_size, random), flipped (p = 0.5) and degraded with a random source derived from (seed, epoch, i) alone, so a
/// batch never depends on thread timing, and a run resumed at position p sees exactly what the uninterrupted run saw.
/// Decoding runs in the background (thread pool) with at most <see cref="TrainingDataOptions.QueueCapacity"/>
/// samples in flight. An unreadable image is skipped with one warning line naming it; the batch takes the next one.
/// </summary>
public sealed class TrainingLoader : IDisposable
{
    readonly IReadOnlyList<TrainingItem> _items;
    readonly TrainingDataOptions _o;
    readonly TextWriter _warnings;
    readonly BlockingCollection<Task<Sample>> _queue;
    readonly CancellationTokenSource _cts = new();
    readonly Task _producer;
    readonly HashSet<string> _warned = new();
    readonly object _permLock = new();
    readonly Dictionary<long, int[]> _perms = new();

    /// <summary>The stream position of the next sample the loop will take (saved in checkpoints for resume).</summary>
    public long Position { get; private set; }
    public int Count => _items.Count;

    public TrainingLoader(IReadOnlyList<TrainingItem> items, TrainingDataOptions options, long startPosition = 0, TextWriter? warnings = null)
    {
        if (items.Count == 0) throw new ArgumentException("the training set is empty");
        if (options.BatchSize < 1) throw new ArgumentException($"batch size must be ≥ 1 (got {options.BatchSize})");
        if (options.OutSize < 8) throw new ArgumentException($"out_size must be ≥ 8 (got {options.OutSize})");
        if (options.QueueCapacity < 1) throw new ArgumentException($"queue capacity must be ≥ 1 (got {options.QueueCapacity})");
        _items = items;
        _o = options;
        _warnings = warnings ?? Console.Error;
        Position = startPosition;
        _queue = new BlockingCollection<Task<Sample>>(options.QueueCapacity);
        var ct = _cts.Token;
        _producer = Task.Run(() =>
        {
            try
            {
                for (long p = startPosition; !ct.IsCancellationRequested; p++)
                {
                    long pos = p;
                    _queue.Add(Task.Run(() => DecodeAt(pos), ct), ct);
                }
            }
            catch (OperationCanceledException) { }
            finally { _queue.CompleteAdding(); }
        });
    }

    /// <summary>The next batch of <see cref="TrainingDataOptions.BatchSize"/> readable samples.</summary>
    public TrainingBatch Next(CancellationToken ct = default)
    {
        var samples = new List<Sample>();
        long start = Position;
        int failuresInARow = 0;
        try
        {
            while (samples.Count < _o.BatchSize)
            {
                var task = _queue.Take(ct);
                Sample s;
                try { s = task.GetAwaiter().GetResult(); }
                catch (OperationCanceledException) when (ct.IsCancellationRequested) { throw; }
                Position++;
                if (s.Error != null)
                {
                    if (_warned.Add(s.Item.Path)) _warnings.WriteLine($"warning: {s.Error} — skipped");
                    if (++failuresInARow >= _items.Count)
                        throw new ArgumentException($"none of the {_items.Count} training images could be read (the last: {s.Error})");
                    continue;
                }
                failuresInARow = 0;
                samples.Add(s);
            }
            return Assemble(samples, start);
        }
        finally
        {
            foreach (var s in samples) s.Dispose();
        }
    }

    TrainingBatch Assemble(List<Sample> samples, long start)
    {
        using var scope = NewDisposeScope();
        var prompts = samples.Select(s => s.Prompt).ToArray();
        var files = samples.Select(s => s.Item.Path).ToArray();
        Tensor gt, lq;
        if (_o.Degradation == TrainingDegradation.FirstOrder)
        {
            gt = stack(samples.Select(s => s.Gt!).ToArray());
            lq = stack(samples.Select(s => s.Lq!).ToArray());
        }
        else
        {
            // The batch transform (official: on the device, per batch) with draws derived from the batch's first position.
            var hq = stack(samples.Select(s => s.Hq!).ToArray());
            var k1 = stack(samples.Select(s => s.Kernel1!).ToArray());
            var k2 = stack(samples.Select(s => s.Kernel2!).ToArray());
            var sinc = stack(samples.Select(s => s.Sinc!).ToArray());
            var rng = new SeededDegradationRandom(TrainingSeeds.Derive(_o.Seed, TrainingSeeds.BatchTransform, start));
            using var draws = new SeededTrainingDraws((long)(TrainingSeeds.Derive(_o.Seed, TrainingSeeds.BatchTransformDraws, start) >> 1));
            (gt, lq) = RealEsrganBatchTransform.Apply(_o.SecondOrder, hq, k1, k2, sinc, rng, draws);
        }
        return new TrainingBatch(gt.MoveToOuterDisposeScope(), lq.MoveToOuterDisposeScope(), prompts, files, start, Position);
    }

    /// <summary>The seeded order of epoch <paramref name="epoch"/> (Fisher–Yates).</summary>
    public static int[] Permutation(long seed, long epoch, int count)
    {
        var perm = Enumerable.Range(0, count).ToArray();
        var rng = new SeededDegradationRandom(TrainingSeeds.Derive(seed, TrainingSeeds.Order, epoch));
        for (int i = count - 1; i > 0; i--)
        {
            int j = (int)(rng.NextDouble() * (i + 1));
            (perm[i], perm[j]) = (perm[j], perm[i]);
        }
        return perm;
    }

    int[] PermutationOf(long epoch)
    {
        lock (_permLock)
        {
            if (!_perms.TryGetValue(epoch, out var p))
            {
                if (_perms.Count > 4) _perms.Remove(_perms.Keys.Min());
                _perms[epoch] = p = Permutation(_o.Seed, epoch, _items.Count);
            }
            return p;
        }
    }

    Sample DecodeAt(long position)
    {
        long epoch = position / _items.Count;
        int i = (int)(position % _items.Count);
        var item = _items[PermutationOf(epoch)[i]];
        try { return Decode(item, _o, new SeededDegradationRandom(TrainingSeeds.Derive(_o.Seed, TrainingSeeds.SampleDraws, epoch, i))); }
        catch (Exception e) when (e is ImageFileException or IOException or UnauthorizedAccessException)
        {
            return new Sample(item, "") { Error = e is ImageFileException ? e.Message : $"{item.Path}: {e.Message}" };
        }
    }

    /// <summary>One sample: read, crop, flip, degrade (first order) or draw kernels (second order), prompt dropout.</summary>
    static Sample Decode(TrainingItem item, TrainingDataOptions o, SeededDegradationRandom rng)
    {
        using var scope = NewDisposeScope();
        using var loaded = ImageIO.Load(item.Path);
        var crop = RandomCrop(loaded.Image, o.OutSize, rng);
        if (o.HorizontalFlip && rng.NextDouble() < 0.5) crop = crop.flip(3);
        string prompt = o.EmptyPromptProbability > 0 && rng.NextDouble() < o.EmptyPromptProbability ? "" : item.Prompt;
        var s = new Sample(item, prompt);
        if (o.Degradation == TrainingDegradation.FirstOrder)
        {
            using var d = o.FirstOrder.Degrade(crop, rng);
            s.Gt = FirstOrderDegradation.Target(crop).squeeze(0).permute(1, 2, 0).contiguous().MoveToOuterDisposeScope();
            s.Lq = d.Lq.squeeze(0).permute(1, 2, 0).contiguous().MoveToOuterDisposeScope();
        }
        else
        {
            s.Hq = crop.squeeze(0).contiguous().MoveToOuterDisposeScope();
            var (k1, k2, sinc) = o.Kernels.Draw(rng);
            s.Kernel1 = k1.MoveToOuterDisposeScope(); s.Kernel2 = k2.MoveToOuterDisposeScope(); s.Sinc = sinc.MoveToOuterDisposeScope();
        }
        return s;
    }

    /// <summary>
    /// A random out×out window; an image with a shorter side below out is first enlarged (bicubic) to that side.
    /// </summary>
    public static Tensor RandomCrop(Tensor image, int outSize, SeededDegradationRandom rng)
    {
        var x = image;
        long h = x.shape[2], w = x.shape[3];
        if (Math.Min(h, w) < outSize)
        {
            double s = (double)outSize / Math.Min(h, w);
            long nh = Math.Max(outSize, (long)Math.Round(h * s)), nw = Math.Max(outSize, (long)Math.Round(w * s));
            x = F.interpolate(x, new[] { nh, nw }, mode: InterpolationMode.Bicubic, align_corners: false).clamp(0, 1);
            h = nh; w = nw;
        }
        long top = (long)(rng.NextDouble() * (h - outSize + 1)), left = (long)(rng.NextDouble() * (w - outSize + 1));
        return x.narrow(2, top, outSize).narrow(3, left, outSize).contiguous();
    }

    public void Dispose()
    {
        _cts.Cancel();
        try { _producer.Wait(TimeSpan.FromSeconds(30)); } catch (AggregateException) { }
        foreach (var t in _queue.GetConsumingEnumerable())
        {
            try { t.Wait(TimeSpan.FromSeconds(30)); if (t.IsCompletedSuccessfully) t.Result.Dispose(); }
            catch (AggregateException) { }
        }
        _queue.Dispose();
        _cts.Dispose();
    }

    sealed class Sample : IDisposable
    {
        public TrainingItem Item { get; }
        public string Prompt { get; }
        public string? Error { get; init; }
        public Tensor? Gt, Lq, Hq, Kernel1, Kernel2, Sinc;
        public Sample(TrainingItem item, string prompt) { Item = item; Prompt = prompt; }
        public void Dispose() { Gt?.Dispose(); Lq?.Dispose(); Hq?.Dispose(); Kernel1?.Dispose(); Kernel2?.Dispose(); Sinc?.Dispose(); }
    }
}

/// <summary>Training images from a folder (recursive) or a file list.</summary>
public static class TrainingSet
{
    /// <summary>
    /// A folder: every image below it (extensions of <see cref="MetricsTable.ImageExtensions"/>, sorted by path, empty
    /// prompts). A file: one image path per line (relative to the list's folder), optionally a tab and its prompt;
    /// blank lines and lines starting with # are ignored.
    /// </summary>
    public static IReadOnlyList<TrainingItem> Find(string path)
    {
        if (Directory.Exists(path))
        {
            var files = Directory.EnumerateFiles(path, "*", SearchOption.AllDirectories)
                .Where(f => MetricsTable.ImageExtensions.Contains(System.IO.Path.GetExtension(f).ToLowerInvariant()))
                .OrderBy(f => f, StringComparer.Ordinal)
                .Select(f => new TrainingItem(f, ""))
                .ToList();
            if (files.Count == 0)
                throw new ArgumentException($"{path}: no images in this folder (looked for {string.Join(", ", MetricsTable.ImageExtensions)}, recursively)");
            return files;
        }
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: no such folder or file list");
        var dir = System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(path))!;
        var items = new List<TrainingItem>();
        int n = 0;
        foreach (var raw in File.ReadLines(path))
        {
            n++;
            var line = raw.TrimEnd('\r');
            if (line.Trim().Length == 0 || line.TrimStart().StartsWith('#')) continue;
            int tab = line.IndexOf('\t');
            var file = (tab >= 0 ? line[..tab] : line).Trim();
            var prompt = tab >= 0 ? line[(tab + 1)..].Trim() : "";
            if (file.Contains('\0')) throw new ArgumentException($"{path}:{n}: not a text file list");
            items.Add(new TrainingItem(System.IO.Path.IsPathRooted(file) ? file : System.IO.Path.Combine(dir, file), prompt));
        }
        if (items.Count == 0) throw new ArgumentException($"{path}: the file list names no images");
        return items;
    }
}

/// <summary>Independent seeds for the parts of a run: SplitMix64 over (seed, part…).</summary>
public static class TrainingSeeds
{
    /// <summary>First part of each derived seed: what it is for (so no two streams can coincide).</summary>
    public const long Order = 1, SampleDraws = 2, BatchTransform = 3, BatchTransformDraws = 4, StepDraws = 5, Validation = 6, Init = 7;

    public static ulong Derive(long seed, params long[] parts)
    {
        ulong h = Mix((ulong)seed ^ 0x243F6A8885A308D3UL);
        foreach (var p in parts) h = Mix(h ^ Mix((ulong)p + 0x9E3779B97F4A7C15UL));
        return h;
    }

    static ulong Mix(ulong z)
    {
        z += 0x9E3779B97F4A7C15UL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }
}
