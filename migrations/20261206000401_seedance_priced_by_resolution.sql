-- Seedance's video is priced by its resolution as well as its seconds:
-- BytePlus bills a video's tokens, which grow with its pixels (1080p about
-- 4.8 times 480p, 720p about 2.1 times). The submission names the
-- operation `video:seedance:<resolution>` (default 1080p, which the worker
-- then asks for explicitly).
--
-- Derived from the deployment's own `video:seedance` price, taken as the
-- 1080p one (the pro model's default, what every video was made at unless
-- its client asked otherwise): 720p at half of it, 480p at three tenths,
-- rounded up. A deployment that priced no Seedance video gets none now
-- either. `video:seedance` itself stays, for a server of the previous
-- release still submitting during a rolling deploy (its videos are made at
-- the provider's default, 1080p for the pro model).
insert into approved_operations (operation, kind, provider, unit, credits_per_unit, max_units)
select 'video:seedance:' || t.resolution, o.kind, o.provider, o.unit,
       greatest(1, ceil(o.credits_per_unit * t.share))::bigint, o.max_units
  from approved_operations o
 cross join (values ('480p', 0.3), ('720p', 0.5), ('1080p', 1.0)) as t (resolution, share)
 where o.operation = 'video:seedance'
on conflict (operation) do nothing;
