using DiffBIR.Lab.Models.Stage1;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Training;

/// <summary>What one stage-1 step computed (before the optimizer step): the summed MSE, the prediction and the target.</summary>
public sealed record Stage1StepResult(Tensor Loss, Tensor Pred, Tensor GtNchw) : IDisposable
{
    public void Dispose() { Loss.Dispose(); Pred.Dispose(); GtNchw.Dispose(); }
}

/// <summary>
/// One training step of the stage-1 restoration module as the official <c>train_stage1.py</c> makes it: SwinIR in
/// training mode (DropPath live), <c>loss = mse_loss(swinir(lq), (gt + 1) / 2, reduction="sum")</c>, then
/// <c>zero_grad; backward; AdamW.step</c> with lr 1e-4, betas (0.9, 0.999), eps 1e-8 and weight decay 0.
/// </summary>
public static class Stage1Trainer
{
    /// <summary>Official learning rate of configs/train/train_stage1.yaml.</summary>
    public const double LearningRate = 1e-4;

    /// <summary>The official optimizer: <c>AdamW(swinir.parameters(), lr, weight_decay=0)</c> (betas and eps torch's defaults).</summary>
    public static optim.Optimizer CreateOptimizer(SwinIR model, double learningRate = LearningRate) =>
        optim.AdamW(model.parameters(), learningRate, 0.9, 0.999, 1e-8, weight_decay: 0);

    /// <summary>
    /// One step on a batch as the loader yields it: <paramref name="gtNhwc"/> [B, H, W, 3] in [-1, 1],
    /// <paramref name="lqNhwc"/> [B, H, W, 3] in [0, 1]. DropPath keep masks come from <paramref name="draws"/>
    /// (null: torch's global generator). The returned tensors are detached; the model's parameters are stepped.
    /// </summary>
    public static Stage1StepResult Step(SwinIR model, Tensor gtNhwc, Tensor lqNhwc, optim.Optimizer optimizer, ITrainingDraws? draws)
    {
        if (gtNhwc.dim() != 4 || gtNhwc.shape[3] != 3 || !gtNhwc.shape.SequenceEqual(lqNhwc.shape))
            throw new ArgumentException($"stage-1 batch: gt [{string.Join(",", gtNhwc.shape)}] and lq [{string.Join(",", lqNhwc.shape)}] must both be [B, H, W, 3]");
        using var scope = NewDisposeScope();
        var (loss, pred, gt) = Forward(model, gtNhwc, lqNhwc, draws);
        optimizer.zero_grad();
        loss.backward();
        optimizer.step();
        return new Stage1StepResult(loss.detach().MoveToOuterDisposeScope(), pred.detach().MoveToOuterDisposeScope(),
            gt.detach().MoveToOuterDisposeScope());
    }

    /// <summary>
    /// The forward half of <see cref="Step"/>: the summed MSE with its graph (for a training loop that accumulates
    /// gradients over micro-batches), in the caller's dispose scope.
    /// </summary>
    public static Tensor Loss(SwinIR model, Tensor gtNhwc, Tensor lqNhwc, ITrainingDraws? draws)
    {
        if (gtNhwc.dim() != 4 || gtNhwc.shape[3] != 3 || !gtNhwc.shape.SequenceEqual(lqNhwc.shape))
            throw new ArgumentException($"stage-1 batch: gt [{string.Join(",", gtNhwc.shape)}] and lq [{string.Join(",", lqNhwc.shape)}] must both be [B, H, W, 3]");
        return Forward(model, gtNhwc, lqNhwc, draws).Loss;
    }

    static (Tensor Loss, Tensor Pred, Tensor Gt) Forward(SwinIR model, Tensor gtNhwc, Tensor lqNhwc, ITrainingDraws? draws)
    {
        model.train();
        model.SetDropPathDraws(draws);
        try
        {
            var device = model.parameters().First().device;
            var gt = ((gtNhwc.to(device) + 1) / 2).permute(0, 3, 1, 2).contiguous().to(ScalarType.Float32);
            var lq = lqNhwc.to(device).permute(0, 3, 1, 2).contiguous().to(ScalarType.Float32);
            var pred = model.forward(lq);
            return (nn.functional.mse_loss(pred, gt, nn.Reduction.Sum), pred, gt);
        }
        finally { model.SetDropPathDraws(null); }
    }
}
