using System.Text.Json.Nodes;
using DiffBIR.Lab.Checkpoints;
using DiffBIR.Lab.Models.Stage1;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Parity.Cases;

/// <summary>Shared steps of the stage-1 cases: build from the fixture config, load strictly, run one forward.</summary>
internal static class Stage1Case
{
    /// <summary>Loads a fixture's weights (strict: the keys must be exactly the official ones) and runs <c>in.x</c>.</summary>
    public static Tensor Forward(nn.Module<Tensor, Tensor> model, Fixture f, string? module = null)
    {
        StateDictLoader.Load(model, f.Weights(module), strict: true, sourceName: f.Path);
        model.eval();
        using var _ = no_grad();
        return model.forward(f.In("x"));
    }

    /// <summary>
    /// Full-size schema check: the module built on the meta device (nothing allocated) must have exactly the schema's
    /// keys and shapes, and its state dict (parameters and persistent buffers) the released element count.
    /// </summary>
    public static IEnumerable<CaseOutput> Schema(Fixture f, string name, Func<nn.Module> build)
    {
        var schema = Checkpoints.Schema.Load(f.Path);
        var loading = JsonNode.Parse(File.ReadAllText(Path.Combine(Path.GetDirectoryName(f.Path)!, "loading.json")))!;
        long released = (long)loading["summary"]![name]!["numel"]!;
        Dictionary<string, long[]> shapes;
        set_default_device(device("meta"));
        try
        {
            using var m = build();
            shapes = m.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.shape);
        }
        finally { set_default_device(CPU); }
        var report = schema.Compare(shapes);
        long numel = shapes.Values.Sum(s => s.Aggregate(1L, (a, b) => a * b));
        yield return new CaseOutput("missing keys", tensor((float)report.Missing.Count), Expected: tensor(0f));
        yield return new CaseOutput("unexpected keys", tensor((float)report.Unexpected.Count), Expected: tensor(0f));
        yield return new CaseOutput("shape mismatches", tensor((float)report.ShapeMismatches.Count), Expected: tensor(0f));
        yield return new CaseOutput($"state_dict numel (released {released})", tensor((double)numel, ScalarType.Float64),
            Expected: tensor((double)released, ScalarType.Float64));
    }
}

/// <summary>bsrnet: the tiny RRDBNet (×4) on a 16×16 input.</summary>
public sealed class BsrnetCase : IParityCase
{
    public string Case => "bsrnet";
    public string Description => "BSRNet = RRDBNet ×4 (diffbir/model/bsrnet.py)";
    // README: float32 vs float64 max_rel 6.75e-07.
    public Tolerance DefaultTolerance => new(1e-5, 0);

    public IEnumerable<CaseOutput> Run(Fixture f)
    {
        using var model = new RRDBNet(RRDBNetConfig.FromJson(f.Config!));
        yield return new CaseOutput("y", Stage1Case.Forward(model, f));
    }
}

/// <summary>swinir: DiffBIR's SwinIR (unshuffle ×8, nearest+conv) on a 64×64 input; the mask is recomputed for the 8×8 token grid.</summary>
public sealed class SwinIRCase : IParityCase
{
    public string Case => "swinir";
    public string Description => "SwinIR with pixel-unshuffle ×8 and nearest+conv upsampling (diffbir/model/swinir.py)";
    // README: float32 vs float64 max_rel 1.18e-06.
    public Tolerance DefaultTolerance => new(1e-5, 0);

    public IEnumerable<CaseOutput> Run(Fixture f)
    {
        using var model = new SwinIR(SwinIRConfig.FromJson(f.Config!));
        yield return new CaseOutput("y", Stage1Case.Forward(model, f));
    }
}

/// <summary>scunet: the tiny SCUNet (stages 3, body, up3 without blocks) on a 64×64 input.</summary>
public sealed class SCUNetCase : IParityCase
{
    public string Case => "scunet";
    public string Description => "SCUNet (diffbir/model/scunet.py)";
    // README: float32 vs float64 max_rel 1.05e-06.
    public Tolerance DefaultTolerance => new(1e-5, 0);

    public IEnumerable<CaseOutput> Run(Fixture f)
    {
        using var model = new SCUNet(SCUNetConfig.FromJson(f.Config!));
        yield return new CaseOutput("y", Stage1Case.Forward(model, f));
    }
}

/// <summary>schema/bsrnet.json: the released BSRNet.pth keys and shapes.</summary>
public sealed class BsrnetSchemaCase : IParityCase
{
    public string Case => "schema_bsrnet";
    public string Description => "full-size RRDBNet (configs/inference/bsrnet.yaml): keys, shapes, element count";
    public Tolerance DefaultTolerance => new(0, 0);
    public IEnumerable<CaseOutput> Run(Fixture f) => Stage1Case.Schema(f, "bsrnet", () => new RRDBNet(RRDBNetConfig.Full));
}

/// <summary>schema/swinir.json: the released SwinIR keys and shapes (with the persistent buffers).</summary>
public sealed class SwinIRSchemaCase : IParityCase
{
    public string Case => "schema_swinir";
    public string Description => "full-size SwinIR (configs/inference/swinir.yaml): keys, shapes, element count";
    public Tolerance DefaultTolerance => new(0, 0);
    public IEnumerable<CaseOutput> Run(Fixture f) => Stage1Case.Schema(f, "swinir", () => new SwinIR(SwinIRConfig.Full));
}

/// <summary>schema/scunet.json: the released scunet_color_real_psnr.pth keys and shapes.</summary>
public sealed class SCUNetSchemaCase : IParityCase
{
    public string Case => "schema_scunet";
    public string Description => "full-size SCUNet (configs/inference/scunet.yaml): keys, shapes, element count";
    public Tolerance DefaultTolerance => new(0, 0);
    public IEnumerable<CaseOutput> Run(Fixture f) => Stage1Case.Schema(f, "scunet", () => new SCUNet(SCUNetConfig.Full));
}
