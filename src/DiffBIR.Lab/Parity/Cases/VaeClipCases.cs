using System.Text.Json.Nodes;
using DiffBIR.Lab.Checkpoints;
using DiffBIR.Lab.Models.Vae;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Parity.Cases;

/// <summary>Schema comparisons shared by the full-size checks: keys and shapes must match exactly, and so must the value count.</summary>
static class SchemaChecks
{
    /// <summary>Builds <paramref name="build"/> on the meta device (nothing is allocated) and compares it with schema/&lt;file&gt;.json.</summary>
    public static IEnumerable<CaseOutput> Compare(Fixture fixture, Func<nn.Module> build, long officialValues)
    {
        var schema = Schema.Load(fixture.Path);
        LoadReport report;
        long ours;
        torch.set_default_device(torch.device("meta"));
        try
        {
            using var module = build();
            report = schema.Compare(module);
            ours = module.state_dict().Values.Sum(t => t.numel());
        }
        finally { torch.set_default_device(torch.CPU); }

        CaseOutput Count(string name, long actual, long expected) =>
            new(name, torch.tensor((double)actual), Expected: torch.tensor((double)expected), Tolerance: new(0, 0));
        // A failing count names its first offending key in the output name, so the report says what is wrong.
        static string First(IReadOnlyList<string> xs) => xs.Count == 0 ? "" : $" (first: {xs[0]})";
        yield return Count("missing keys" + First(report.Missing), report.Missing.Count, 0);
        yield return Count("unexpected keys" + First(report.Unexpected), report.Unexpected.Count, 0);
        yield return Count("shape mismatches" + First(report.ShapeMismatches), report.ShapeMismatches.Count, 0);
        yield return Count("values (schema)", ours, schema.NumElements);
        yield return Count("values (schema/loading.json)", ours, officialValues);
    }
}

/// <summary>vae: the KL autoencoder's posterior, the scaled latent DiffBIR conditions on, and both decodes.</summary>
public sealed class VaeCase : IParityCase
{
    public string Case => "vae";
    public string Description => "AutoencoderKL (KL-f8): posterior mean/logvar/std, mode·0.18215, decode, decode(z/0.18215)";
    // The fixture's float32-vs-float64 max_rel is ≤ 1.1e-6 for every output.
    public Tolerance DefaultTolerance => new(1e-5, 0);

    public IEnumerable<CaseOutput> Run(Fixture f)
    {
        using var vae = new AutoencoderKL(VaeConfig.FromJson(f.Config!));
        StateDictLoader.Load(vae, f.Weights(), strict: true, sourceName: f.Path);
        vae.eval();
        using var _ = torch.no_grad();
        var x = f.In("x");
        var z = f.In("z");
        var posterior = vae.Encode(x);
        yield return new CaseOutput("posterior_mean", posterior.Mean);
        yield return new CaseOutput("posterior_logvar", posterior.LogVar);
        yield return new CaseOutput("posterior_std", posterior.Std);
        yield return new CaseOutput("mode_scaled", vae.EncodeScaled(x));
        yield return new CaseOutput("decode", vae.Decode(z));
        yield return new CaseOutput("decode_of_scaled", vae.DecodeScaled(z));
    }
}

/// <summary>schema/vae.json: the full-size SD 2.1 VAE (configs/inference/cldm.yaml vae_cfg) has exactly the official keys and shapes.</summary>
public sealed class VaeSchemaCase : IParityCase
{
    public string Case => "schema_vae";
    public string Description => "full-size AutoencoderKL state_dict keys and shapes (cldm.yaml vae_cfg), built on the meta device";
    public Tolerance DefaultTolerance => new(0, 0);

    public IEnumerable<CaseOutput> Run(Fixture f) => SchemaChecks.Compare(f, () => new AutoencoderKL(VaeConfig.Sd21), 83_653_863);
}
