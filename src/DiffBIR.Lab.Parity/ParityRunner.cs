using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Parity;

/// <summary>Pass when max|actual − expected| ≤ Atol + Rtol · max|expected| (the fixtures' max_rel convention).</summary>
public sealed record Tolerance(double Rtol, double Atol)
{
    public static Tolerance Module { get; } = new(1e-4, 1e-6);
    /// <summary>Judged by an absolute band only (rtol 0, atol &gt; 0): the output's max_rel is not an error figure.</summary>
    public bool AbsoluteOnly => Rtol == 0 && Atol > 0;
    public override string ToString() => $"rtol={Rtol:G3} atol={Atol:G3}";
}

/// <summary>What a case produced for one expected output.</summary>
/// <remarks>The expected value is the fixture's <c>out.&lt;Name&gt;</c> tensor, unless the case supplies it (fixtures that are
/// not safetensors files, such as checkpoints/expected.json).</remarks>
public sealed record CaseOutput(string Name, Tensor? Actual, string? SkipReason = null, Tolerance? Tolerance = null, Tensor? Expected = null)
{
    public static CaseOutput Skip(string name, string reason) => new(name, null, reason);
}

/// <summary>
/// One kind of fixture: runs the inputs through our implementation and returns an output for every
/// <c>out.*</c> tensor of the file (or says, with a reason, why an output is not compared).
/// </summary>
public interface IParityCase
{
    /// <summary>The <c>__metadata__["case"]</c> value this handles.</summary>
    string Case { get; }
    string Description { get; }
    Tolerance DefaultTolerance { get; }
    IEnumerable<CaseOutput> Run(Fixture fixture);
}

public enum CaseStatus { Pass, Fail, NotImplemented, Error }

public sealed record OutputReport(string Name, double MaxAbs, double MaxRel, Tolerance Tolerance, bool Pass, string? Note = null)
{
    public bool Skipped => Note != null && double.IsNaN(MaxAbs);
}

public sealed record CaseReport(string File, string Case, CaseStatus Status, IReadOnlyList<OutputReport> Outputs, string? Message, TimeSpan Elapsed)
{
    public double WorstRel => Worst(_ => true);

    /// <summary>Worst max_rel over the outputs judged by an absolute band only (<see cref="Tolerance.AbsoluteOnly"/>:
    /// structurally zero gradients and the like, whose max_rel divides rounding noise by rounding noise); NaN where
    /// there are none.</summary>
    public double WorstRelAbsoluteBand => Worst(o => o.Tolerance.AbsoluteOnly);

    /// <summary>Worst max_rel over every other output (relative bands and exact ones): the figure to quote.</summary>
    public double WorstRelBanded => Worst(o => !o.Tolerance.AbsoluteOnly);

    double Worst(Func<OutputReport, bool> which) =>
        Outputs.Where(o => !double.IsNaN(o.MaxRel) && which(o)).Select(o => o.MaxRel).DefaultIfEmpty(double.NaN).Max();
}

/// <summary>
/// Compares our implementation with the official code, fixture by fixture. A case we have not implemented is
/// reported as <see cref="CaseStatus.NotImplemented"/>, never as a pass.
/// </summary>
public sealed class ParityRunner
{
    readonly Dictionary<string, IParityCase> _cases;

    public ParityRunner(IEnumerable<IParityCase> cases) => _cases = cases.ToDictionary(c => c.Case);

    /// <summary>A runner with every case this build implements.</summary>
    public static ParityRunner Default() => new(ParityCases.All());

    public IReadOnlyCollection<string> ImplementedCases => _cases.Keys;
    public bool IsImplemented(string @case) => _cases.ContainsKey(@case);

    /// <summary>Expands files and folders (recursively) into fixture files, sorted.</summary>
    public static List<string> FindFixtures(IEnumerable<string> paths)
    {
        var files = new List<string>();
        foreach (var p in paths)
        {
            if (Directory.Exists(p))
                files.AddRange(Directory.EnumerateFiles(p, "*", SearchOption.AllDirectories).Where(Fixture.IsFixtureFile));
            else if (File.Exists(p)) files.Add(p);
            else throw new FileNotFoundException($"{p}: no such file or folder");
        }
        return files.Select(Path.GetFullPath).Distinct().OrderBy(f => f, StringComparer.Ordinal).ToList();
    }

    public CaseReport RunFile(string file, Tolerance? overrideTol = null, Action<string>? log = null)
    {
        var sw = System.Diagnostics.Stopwatch.StartNew();
        string @case;
        try { @case = Fixture.CaseOf(file); }
        catch (Exception e) { return new CaseReport(file, "?", CaseStatus.Error, Array.Empty<OutputReport>(), e.Message, sw.Elapsed); }
        if (!_cases.TryGetValue(@case, out var impl))
            return new CaseReport(file, @case, CaseStatus.NotImplemented, Array.Empty<OutputReport>(), "case not implemented yet", sw.Elapsed);

        using var scope = torch.NewDisposeScope();
        try
        {
            using var fx = Fixture.Load(file);
            var expected = fx.OutputNames.ToHashSet();
            var outputs = new List<OutputReport>();
            foreach (var o in impl.Run(fx))
            {
                var tol = overrideTol ?? o.Tolerance ?? impl.DefaultTolerance;
                if (o.SkipReason != null)
                {
                    outputs.Add(new OutputReport(o.Name, double.NaN, double.NaN, tol, true, o.SkipReason));
                    expected.Remove(o.Name);
                    continue;
                }
                var exp = o.Expected ?? (fx.Tensors.TryGetValue("out." + o.Name, out var e) ? e
                    : throw new InvalidOperationException($"case produced '{o.Name}', which the fixture does not hold"));
                expected.Remove(o.Name);
                outputs.Add(Compare(o.Name, o.Actual!, exp, tol));
                log?.Invoke($"  {o.Name}");
            }
            foreach (var missing in expected.OrderBy(x => x))
                outputs.Add(new OutputReport(missing, double.NaN, double.NaN, impl.DefaultTolerance, false, "expected output not produced"));
            var status = outputs.All(x => x.Pass) ? CaseStatus.Pass : CaseStatus.Fail;
            return new CaseReport(file, @case, status, outputs, null, sw.Elapsed);
        }
        catch (Exception e)
        {
            return new CaseReport(file, @case, CaseStatus.Error, Array.Empty<OutputReport>(), e.GetType().Name + ": " + e.Message, sw.Elapsed);
        }
    }

    /// <summary>max_abs, max_rel = max_abs / max|expected| (as in the fixture README), pass/fail.</summary>
    public static OutputReport Compare(string name, Tensor actual, Tensor expected, Tolerance tol)
    {
        if (!actual.shape.SequenceEqual(expected.shape))
            return new OutputReport(name, double.NaN, double.NaN, tol, false,
                $"shape [{string.Join(", ", actual.shape)}] vs expected [{string.Join(", ", expected.shape)}]");
        using var scope = torch.NewDisposeScope();
        var a = actual.detach().cpu().to(ScalarType.Float64);
        var b = expected.to(ScalarType.Float64);
        if (a.numel() == 0) return new OutputReport(name, 0, 0, tol, true);
        bool aFinite = a.isfinite().all().item<bool>(), bFinite = b.isfinite().all().item<bool>();
        if (!aFinite || !bFinite)
        {
            // Non-finite values must sit in the same places with the same values.
            var same = a.isnan().eq(b.isnan()).all().item<bool>() && a.isinf().eq(b.isinf()).all().item<bool>()
                       && a.where(a.isinf(), 0).eq(b.where(b.isinf(), 0)).all().item<bool>();
            if (!same) return new OutputReport(name, double.PositiveInfinity, double.PositiveInfinity, tol, false, "non-finite values differ");
            var mask = a.isfinite().logical_and(b.isfinite());
            a = a.where(mask, 0); b = b.where(mask, 0);
        }
        double maxAbs = (a - b).abs().max().item<double>();
        double refMax = b.abs().max().item<double>();
        double maxRel = refMax > 0 ? maxAbs / refMax : (maxAbs == 0 ? 0 : double.PositiveInfinity);
        bool pass = maxAbs <= tol.Atol + tol.Rtol * refMax;
        return new OutputReport(name, maxAbs, maxRel, tol, pass);
    }
}
