using DiffBIR.Lab.Diffusion;
using DiffBIR.Lab.Guidance;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Sampling;

/// <summary>What an observer sees after each sampler step's main model evaluation.</summary>
public sealed record StepInfo(int Step, int Timestep, Tensor Zt, Tensor PredictedX0, bool GuidanceApplied, double? GuidanceLoss, double? GradientNorm);

/// <summary>
/// The sample-step / guide loop, as a reusable driver (the same ten lines a notebook can write itself):
/// for each request of the run, the CFG model output, x̂₀, optional guidance of x̂₀ (main evaluations only, i.e.
/// once per step), the observer, then the sampler step. Every iteration runs in its own dispose scope. The observer
/// returns false to cancel: <see cref="Run"/> then returns null.
/// </summary>
public static class SamplingLoop
{
    public static Tensor? Run(SamplerRun run, CfgDenoiser model, Guide? guide = null, Func<StepInfo, bool>? observer = null)
    {
        while (!run.IsDone)
        {
            using var scope = torch.NewDisposeScope();
            var req = run.Request!;
            var output = model.Predict(req);
            Tensor? guided = null;
            GuideResult? g = null;
            if (req.IsMain && (guide is not null || observer is not null))
            {
                var x0 = req.ToX0(output);
                if (guide is not null)
                {
                    g = guide.Apply(x0, req.Timestep, req.X0Coefficient);
                    if (g.Applied) guided = g.X0;
                }
                if (observer is not null &&
                    !observer(new StepInfo(req.Step, req.Timestep, req.State, guided ?? x0, g?.Applied ?? false, g?.Loss, g?.GradientNorm)))
                    return null;
            }
            run.Step(output, guided);
        }
        return run.Result;
    }

    /// <summary>The whole official <c>sampler.sample(...)</c>: make the sampler from its name, run it from x_T.</summary>
    public static Tensor Sample(string samplerType, NoiseSchedule schedule, SamplerOptions options, CfgDenoiser model,
                                Tensor xT, int steps, INoiseSource noise, Guide? guide = null, Func<StepInfo, bool>? observer = null)
    {
        using var run = Samplers.Create(samplerType, schedule, options).Start(xT, steps, noise);
        return Run(run, model, guide, observer) ?? throw new OperationCanceledException("sampling cancelled by the observer");
    }
}
