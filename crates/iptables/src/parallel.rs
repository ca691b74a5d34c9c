//! Independent work spread over the cores: a cold sync renders every service port, each on its own, and
//! serialises tens of megabytes of rules; at 10,000 services each is tens of milliseconds of one core. The
//! result is the same, in the same order, whatever the number of threads.

/// Below this many items per thread, starting threads costs more than it saves.
pub const MIN_ITEMS_PER_THREAD: usize = 256;

/// How many threads `items` items of work are worth: one per core, each with at least `min_per_thread` items.
pub fn threads_for(items: usize, min_per_thread: usize) -> usize {
    let min_per_thread = min_per_thread.max(1);
    // Asked before the cores are counted: counting reads the cgroup's CPU quota, and a change's sync renders
    // one service port.
    if items < 2 * min_per_thread {
        return 1;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.min(items / min_per_thread).max(1)
}

/// `f` of every item, in order: on as many threads as there are cores and chunks of at least `min_per_thread`
/// items, on the calling thread alone when that is one.
pub fn map_in_order<T, R, F>(items: &[T], min_per_thread: usize, f: F) -> Vec<R>
where
    T: Sync,
    R: Send,
    F: Fn(&T) -> R + Sync,
{
    let threads = threads_for(items.len(), min_per_thread);
    if threads == 1 {
        return items.iter().map(f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .skip(1)
            .map(|part| scope.spawn(move || part.iter().map(f).collect::<Vec<R>>()))
            .collect();
        // The first chunk on this thread, while the others run.
        let mut out: Vec<R> = Vec::with_capacity(items.len());
        out.extend(items[..chunk.min(items.len())].iter().map(f));
        for handle in handles {
            // A panic in a render is a bug: carry it to the caller as if it had happened here.
            match handle.join() {
                Ok(part) => out.extend(part),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        out
    })
}

/// `f` of every item, each on a thread of its own but the first, which runs on the calling thread: for work
/// already cut into one piece per core, such as the regions of one buffer that different threads fill.
pub fn for_each_in_parallel<T, F>(items: Vec<T>, f: F)
where
    T: Send,
    F: Fn(T) + Sync,
{
    let mut items = items.into_iter();
    let Some(first) = items.next() else {
        return;
    };
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = items.map(|item| scope.spawn(move || f(item))).collect();
        f(first);
        for handle in handles {
            if let Err(panic) = handle.join() {
                std::panic::resume_unwind(panic);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_order_and_the_results_do_not_depend_on_the_threads() {
        let items: Vec<u32> = (0..10_000).collect();
        let want: Vec<u64> = items.iter().map(|i| u64::from(*i) * 3).collect();
        for min in [1, 7, 256, 5_000, 10_000, 20_000] {
            assert_eq!(map_in_order(&items, min, |i| u64::from(*i) * 3), want, "{min}");
        }
        assert!(map_in_order(&[] as &[u32], 1, |i| *i).is_empty());
        assert_eq!(map_in_order(&[5u32], 1, |i| *i), vec![5]);
    }

    #[test]
    fn each_item_is_handed_over_once() {
        let mut buffer = vec![0u8; 64];
        let regions: Vec<(u8, &mut [u8])> = buffer.chunks_mut(16).zip(1u8..).map(|(r, i)| (i, r)).collect();
        for_each_in_parallel(regions, |(i, region)| region.fill(i));
        assert_eq!(buffer, [[1u8; 16], [2; 16], [3; 16], [4; 16]].concat());
        for_each_in_parallel(Vec::<u8>::new(), |_| unreachable!());
    }

    #[test]
    #[should_panic(expected = "item 9000")]
    fn a_panic_on_another_thread_reaches_the_caller() {
        let items: Vec<u32> = (0..10_000).collect();
        map_in_order(&items, 1, |i| assert_ne!(*i, 9000, "item 9000"));
    }
}
